"""charts/slam through Helm's own engine (helm-python-sdk): lint, render, and every rendered object validated
for a recent Kubernetes (kubernetes-validate) or against its CRD."""

from __future__ import annotations

import helm_python as helm
import pytest
import yaml
from k8s_fixtures import (
    CHART,
    KUBE_VERSION,
    MANIFESTS,
    OPERATOR_GRANTS,
    crds_by_kind,
    granted,
    load_docs,
    validate_object,
    wildcards,
)

NAMESPACE = "slam-system"
DEFAULT: dict = {}
# The non-default set: 3 replicas with 2 GPUs each, ServiceMonitor and MinIO on.
FULL = {
    "operator": {"replicas": 3, "metricsPort": 9090},
    "minio": {"enabled": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "inference": {"enabled": True, "name": "llama", "spec": {
        "image": "slam-serve:cuda", "replicas": 3, "model": {"source": "/models/llama", "dtype": "bfloat16",
                                                             "pvcName": "models"},
        "resources": {"gpus": 2, "memory": "32Gi"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
}

# Every other knob turned once.
OPTIONS = {
    "fullnameOverride": "ops",
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {"healthPort": 8081, "extraEnv": [{"name": "TZ", "value": "UTC"}],
                 "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                     {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}},
                 "nodeSelector": {"pool": "system"}, "tolerations": [{"key": "system", "operator": "Exists"}]},
    "serviceAccount": {"name": "custom-sa"},
    "minio": {"enabled": True, "name": "s3", "bucket": "ckpt", "auth": {"create": False, "secretName": "mine"},
              "nodeSelector": {"pool": "system"}},
    "inference": {"enabled": True, "spec": {"checkpoint": {"endpoint": "s3.example.com:443", "bucket": "ckpt-store",
                                                           "secure": True}}},
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values, namespace=NAMESPACE) -> list[dict]:
    out = chart.render(values, name="slam", namespace=namespace)
    return [d for path, text in sorted(out.items()) if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def find(docs, kind, name=None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


@pytest.mark.parametrize("values", [DEFAULT, FULL], ids=["default", "full"])
def test_lint_has_no_errors_or_warnings(values):
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_a_bad_value():
    report = helm.lint(CHART, {"operator": {"replicas": -1}}, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert any("replicas" in m["error"] for m in report["messages"] if m["severity"] == 3)


def test_default_values_render_only_the_operator(chart):
    docs = render(chart, DEFAULT)
    assert sorted(d["kind"] for d in docs) == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"])
    (deploy,) = find(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2


def test_full_values_render_minio_monitors_and_the_inference(chart):
    docs = render(chart, FULL)
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PodMonitor", "Secret", "Job", "SLAMInference"} <= kinds
    (inference,) = find(docs, "SLAMInference", "llama")
    spec = inference["spec"]
    assert spec["replicas"] == 3 and spec["resources"]["gpus"] == 2
    # With no checkpoint section of its own, the inference checkpoints to the chart's MinIO.
    (minio,) = find(docs, "Service", "minio")
    (secret,) = find(docs, "Secret")
    assert spec["checkpoint"] == {"endpoint": f"minio.{NAMESPACE}.svc:9000", "bucket": "slam",
                                  "secretRef": {"name": secret["metadata"]["name"]}}
    assert [p["port"] for p in minio["spec"]["ports"]] == [9000]
    (operator,) = find(docs, "Deployment", "slam-operator")
    assert operator["spec"]["replicas"] == 3


@pytest.mark.parametrize("values", [DEFAULT, FULL, OPTIONS], ids=["default", "full", "options"])
def test_every_rendered_object_validates(chart, values):
    crds = crds_by_kind([d for c in chart.crds for d in yaml.safe_load_all(c["data"]) if d])
    checked = {}
    for doc in render(chart, values):
        checked[f"{doc['kind']}/{doc['metadata']['name']}"] = validate_object(doc, crds)
        if doc["kind"] != "ClusterRole" and doc["kind"] != "ClusterRoleBinding":
            assert doc["metadata"]["namespace"] == NAMESPACE
    unchecked = {k for k, how in checked.items() if how == "unchecked"}
    assert unchecked == ({"ServiceMonitor/slam-operator", "PodMonitor/slam-servers"} if values is FULL else set())
    if values is not DEFAULT:
        assert "crd" in checked.values()  # the SLAMInference, against the chart's CRD


def test_options_reach_the_objects(chart):
    docs = render(chart, OPTIONS)
    (operator,) = find(docs, "Deployment", "ops-operator")
    pod = operator["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "custom-sa" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["affinity"] == OPTIONS["operator"]["affinity"] and pod["nodeSelector"] == {"pool": "system"}
    (main,) = pod["containers"]
    assert main["args"][0].endswith("--liveness http://0.0.0.0:8081/healthz")
    assert main["livenessProbe"]["httpGet"]["port"] == "health" and main["ports"][0]["containerPort"] == 8081
    assert {"name": "TZ", "value": "UTC"} in main["env"]
    assert find(docs, "Secret") == []  # auth.create false: the user's Secret "mine" is used
    (job,) = find(docs, "Job", "s3-create-bucket")
    assert "local/ckpt" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert job["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    (inference,) = find(docs, "SLAMInference")
    assert inference["spec"]["checkpoint"]["endpoint"] == "s3.example.com:443"  # its own store wins


def test_monitors_scrape_ports_that_exist(chart):
    docs = render(chart, FULL)
    (monitor,) = find(docs, "ServiceMonitor")
    (service,) = find(docs, "Service", "slam-operator-metrics")
    (operator,) = find(docs, "Deployment", "slam-operator")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= operator["spec"]["template"]["metadata"]["labels"].items()
    container_ports = {p["name"] for p in operator["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    (pods,) = find(docs, "PodMonitor")
    assert pods["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "slam"}
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    assert [e["port"] for e in pods["spec"]["podMetricsEndpoints"]] == ["http"]


def test_operator_monitor_only_with_a_metrics_port(chart):
    docs = render(chart, {"serviceMonitor": {"enabled": True}})
    assert [d["kind"] for d in docs if d["kind"].endswith("Monitor")] == ["PodMonitor"]
    (operator,) = find(docs, "Deployment")
    assert [p["name"] for p in operator["spec"]["template"]["spec"]["containers"][0]["ports"]] == ["health"]


def test_values_schema_holds_the_crd_spec_schema():
    import sync_crds  # charts/sync_crds.py, on the path through k8s_fixtures

    assert (CHART / "values.schema.json").read_text() == sync_crds.values_schema(), "run python charts/sync_crds.py"


def test_chart_crds_equal_the_manifests(chart):
    copies = {c["filename"].rpartition("/")[2]: c["data"] for c in chart.crds}
    expected = {"slaminferences.yaml": "crd.yaml", "kopf-peering.yaml": "kopf-peering.yaml"}
    assert set(copies) == set(expected)
    for copy, source in expected.items():
        assert copies[copy] == (MANIFESTS / source).read_text(), f"run python charts/sync_crds.py ({copy})"


@pytest.mark.parametrize("values", [DEFAULT, FULL], ids=["default", "full"])
def test_rbac_is_least_privilege_and_matches_the_manifests(chart, values):
    docs = render(chart, values)
    assert wildcards(docs) == []
    assert granted(docs) == OPERATOR_GRANTS
    manifests = load_docs(MANIFESTS / "rbac.yaml")
    assert find(docs, "ClusterRole")[0]["rules"] == find(manifests, "ClusterRole")[0]["rules"]
    (binding,) = find(docs, "ClusterRoleBinding")
    (account,) = find(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]


def test_operator_pod_matches_the_manifests(chart):
    (rendered,) = find(render(chart, DEFAULT), "Deployment")
    (manifest,) = find(load_docs(MANIFESTS / "operator.yaml"), "Deployment")
    ours, theirs = rendered["spec"]["template"]["spec"], manifest["spec"]["template"]["spec"]
    for key in ("securityContext", "initContainers", "containers", "volumes"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize(("values", "where"), [
    ({"operator": {"replicas": -1}}, "/operator/replicas"),
    ({"operator": {"replica": 2}}, "additional properties 'replica'"),
    ({"minio": {"enabled": "yes"}}, "/minio/enabled"),
    ({"minio": {"bucket": "Bad_Bucket"}}, "/minio/bucket"),
    ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
    ({"inference": {"spec": {"replicas": -2}}}, "/inference/spec/replicas"),
    ({"inference": {"spec": {"cache": {"policy": "lru"}}}}, "/inference/spec/cache/policy"),
    ({"inference": {"spec": {"replica": 2}}}, "additional properties 'replica'"),
])
def test_values_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="slam", namespace=NAMESPACE)


def test_notes_tell_how_to_watch_a_failover(chart):
    notes = chart.render(FULL | {"inference": {"enabled": False}}, name="slam", namespace=NAMESPACE)[
        "slam/templates/NOTES.txt"]
    assert "kubectl get slam -w" in notes and "kubectl describe slam" in notes and f"minio.{NAMESPACE}.svc:9000" in notes


def test_chart_minio_in_default_is_the_manifests_minio(chart):
    docs = render(chart, {"minio": {"enabled": True}}, namespace="default")
    manifests = load_docs(MANIFESTS / "minio.yaml")
    for kind, name in (("Deployment", "minio"), ("Job", "minio-create-bucket")):
        (ours,) = find(docs, kind, name)
        (theirs,) = find(manifests, kind, name)
        assert ours["spec"]["template"]["spec"] == theirs["spec"]["template"]["spec"], f"{kind}/{name}"
    (secret,) = find(docs, "Secret", "slam-s3")
    assert set(secret["stringData"]) == set(find(manifests, "Secret", "slam-s3")[0]["stringData"])
