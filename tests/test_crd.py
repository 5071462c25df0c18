"""The SLAMInference CRD: structural, defaulting, and rejecting bad specs with the field or rule named.

Schema through jsonschema, defaults applied top-down as the API server does, CEL rules through cel-python.
"""

from __future__ import annotations

import copy

import celpy
import kubernetes_validate
import pytest
from k8s_fixtures import (
    KUBE_VERSION,
    MANIFESTS,
    Invalid,
    admit,
    cel_rules,
    load_crd,
    load_docs,
    structural_problems,
    version_schema,
)

CRD = load_crd()
SCHEMA = version_schema(CRD)


def minimal(**spec) -> dict:
    return {"apiVersion": "slam.dev/v1alpha1", "kind": "SLAMInference", "metadata": {"name": "m"}, "spec": spec}


def test_crd_is_a_valid_kubernetes_object_with_the_contract_names():
    kubernetes_validate.validate(CRD, KUBE_VERSION, strict=True)
    names = CRD["spec"]["names"]
    assert CRD["metadata"]["name"] == "slaminferences.slam.dev"
    assert (names["kind"], names["plural"], names["shortNames"]) == ("SLAMInference", "slaminferences", ["slam"])
    assert CRD["spec"]["scope"] == "Namespaced"
    (version,) = CRD["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Model": ".spec.model.source", "Replicas": ".spec.replicas", "Ready": ".status.readyReplicas",
                       "Phase": ".status.phase", "Failovers": ".status.failovers", "Age": ".metadata.creationTimestamp"}


def test_schema_is_structural_and_keeps_unknown_fields_only_in_kopf_status():
    assert structural_problems(SCHEMA) == []
    preserved = []

    def walk(node, path):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            preserved.append(path)
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(SCHEMA, "")
    assert preserved == [".status.kopf"]


def test_cel_rules_are_standard_cel_that_celpy_compiles():
    rules = cel_rules(SCHEMA)
    assert {r.path for r in rules} == {"spec.cache", "spec.checkpoint"}
    env = celpy.Environment()
    for r in rules:
        env.compile(r.rule)  # raises CELParseError on anything outside the standard grammar


def test_empty_spec_gets_every_default():
    spec = admit(CRD, minimal())["spec"]
    assert spec["image"] == "slam-serve:cpu" and spec["imagePullPolicy"] == "IfNotPresent"
    assert spec["replicas"] == 1 and spec["nodeFailureGraceSeconds"] == 60
    assert spec["model"] == {"source": "embedded", "dtype": "auto"}
    assert spec["cache"] == {"policy": "slam", "budget": 256, "sink": 4, "recent": 64,
                             "reserveDevice": "auto", "reserveDtype": "auto"}
    assert spec["server"] == {"port": 8000, "maxBatch": 8, "maxQueue": 64, "asyncScheduling": "auto",
                              "enforceEager": False}
    assert spec["resources"] == {"gpus": 0}
    # No checkpoint section: checkpointing off, and the rest of the section still defaulted.
    assert spec["checkpoint"] == {"enabled": False, "prefix": "checkpoints", "secure": False, "intervalTokens": 16,
                                  "maxAgeSeconds": 86400, "deleteOnCleanup": False}


def test_checkpoint_section_turns_checkpointing_on_with_its_defaults():
    spec = admit(CRD, minimal(checkpoint={"endpoint": "minio:9000", "bucket": "slam", "secretRef": {"name": "s"}}))
    ck = spec["spec"]["checkpoint"]
    assert ck["enabled"] is True and ck["secretRef"] == {"name": "s", "accessKeyKey": "accessKey",
                                                         "secretKeyKey": "secretKey"}


@pytest.mark.parametrize("path", sorted((MANIFESTS / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate_after_defaulting(path):
    for doc in load_docs(path):
        spec = admit(CRD, doc)["spec"]
        assert spec["checkpoint"]["enabled"] is True


def test_gpu_example_asks_for_a_gpu_in_bfloat16_from_a_volume():
    (doc,) = load_docs(MANIFESTS / "examples" / "slaminference-gpu.yaml")
    spec = admit(CRD, doc)["spec"]
    assert spec["resources"]["gpus"] == 1 and spec["model"]["dtype"] == "bfloat16" and spec["model"]["pvcName"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


# YAML 1.1 reads an unquoted `on` as true: the schema names the field rather than taking it as a mode.
BAD_MODES = [({"server": {"asyncScheduling": True}}, "spec.server.asyncScheduling: True is not of type 'string'"),
             ({"server": {"asyncScheduling": "always"}}, "spec.server.asyncScheduling: 'always' is not one of"),
             ({"server": {"enforceEager": "yes"}}, "spec.server.enforceEager: 'yes' is not of type 'boolean'")]
BAD = [
    ({"replicas": -1}, "replicas: -1 is less than the minimum of 0"),
    ({"cache": {"budget": 68}}, "spec.cache: cache.budget must be larger than cache.sink + cache.recent"),
    ({"cache": {"budget": 10, "sink": 4, "recent": 8}}, "cache.budget must be larger"),
    ({"checkpoint": {"endpoint": "minio:9000"}}, "spec.checkpoint: checkpoint.bucket is required"),
    ({"checkpoint": {"bucket": "slam"}}, "checkpoint.endpoint is required"),
    ({"checkpoint": {"endpoint": "minio:9000", "bucket": ""}}, "spec.checkpoint.bucket: '' does not match"),
    ({"cache": {"policy": "lru"}}, "spec.cache.policy: 'lru' is not one of"),
    ({"replica": 2}, "spec: Additional properties are not allowed ('replica' was unexpected)"),
    ({"cache": {"budgets": 2}}, "'budgets' was unexpected"),
    ({"model": {"dtype": "fp8"}}, "spec.model.dtype: 'fp8' is not one of"),
    ({"checkpoint": {"endpoint": "http://minio:9000", "bucket": "slam"}}, "spec.checkpoint.endpoint"),
    ({"checkpoint": {"endpoint": "m:9000", "bucket": "slam", "secretRef": {}}}, "'name' is a required property"),
    ({"server": {"port": 0}}, "spec.server.port: 0 is less than the minimum of 1"),
    ({"resources": {"memory": "lots"}}, "spec.resources.memory: 'lots' does not match"),
    ({"nodeFailureGraceSeconds": -5}, "nodeFailureGraceSeconds: -5 is less than the minimum"),
    ({"tolerations": [{"key": "k", "operator": "Maybe"}]}, "spec.tolerations.0.operator"),
    *BAD_MODES,
]


@pytest.mark.parametrize(("spec", "named"), BAD, ids=[str(s) for s, _ in BAD])
def test_bad_spec_is_rejected_naming_the_field_or_rule(spec, named):
    with pytest.raises(Invalid) as err:
        admit(CRD, minimal(**spec))
    assert named in str(err.value)


def test_full_policy_needs_no_budget_above_sink_plus_recent():
    spec = admit(CRD, minimal(cache={"policy": "full", "budget": 1}))["spec"]
    assert spec["cache"]["policy"] == "full"


def test_disabled_checkpointing_needs_no_bucket():
    admit(CRD, minimal(checkpoint={"enabled": False}))


def test_quantities_accept_integers_and_suffixes():
    spec = admit(CRD, minimal(resources={"cpu": 2, "memory": "512Mi", "gpus": 2}))["spec"]
    assert spec["resources"] == {"cpu": 2, "memory": "512Mi", "gpus": 2}


def test_status_schema_takes_what_the_operator_writes():
    obj = minimal()
    obj["status"] = {
        "phase": "Degraded", "replicas": 2, "readyReplicas": 1, "failovers": 1, "observedGeneration": 3,
        "selector": "app.kubernetes.io/name=slam,app.kubernetes.io/instance=m",
        "slots": [{"slot": 0, "pod": "m-0-abcde", "node": "n1", "epoch": 2, "phase": "Running", "ready": True,
                   "restoredRequests": 4}],
        "conditions": [{"type": "Degraded", "status": "True", "reason": "NodeNotReady", "message": "slot 1",
                        "lastTransitionTime": "2026-11-23T18:00:00Z"}],
        "kopf": {"anything": {"goes": 1}},
    }
    admit(CRD, obj)
    bad = copy.deepcopy(obj)
    bad["status"]["phase"] = "Exploded"
    with pytest.raises(Invalid, match="status.phase"):
        admit(CRD, bad)


def test_printer_columns_and_scale_paths_exist_in_the_schema():
    (version,) = CRD["spec"]["versions"]
    scale = version["subresources"]["scale"]
    paths = [c["jsonPath"] for c in version["additionalPrinterColumns"]] + [
        scale["specReplicasPath"], scale["statusReplicasPath"], scale["labelSelectorPath"]]
    for path in (p for p in paths if not p.startswith(".metadata.")):  # ObjectMeta is the API server's
        node = SCHEMA
        for part in path.strip(".").split("."):
            node = node["properties"][part] if part in node.get("properties", {}) else None
            assert node is not None, f"{path} is not in the schema"


# The operator repeats the schema's defaults and rules for specs that reach it unvalidated
# (operator/slam_operator/spec.py); the two must agree on the contract.
AGREED_BAD = [spec for spec, _ in BAD[:9] + BAD_MODES]


@pytest.mark.parametrize("spec", [{}, *({"checkpoint": {"enabled": False}},)] + [
    d["spec"] for p in sorted((MANIFESTS / "examples").glob("*.yaml")) for d in load_docs(p)])
def test_operator_spec_model_defaults_like_the_crd(spec):
    operator_spec = pytest.importorskip("slam_operator.spec")
    parsed = operator_spec.parse_spec(copy.deepcopy(spec)).model_dump(exclude_none=True)
    defaulted = admit(CRD, minimal(**spec))["spec"]
    for key in ("nodeSelector", "tolerations"):  # the model's empty defaults; the schema has none
        if not parsed[key] and key not in defaulted:
            del parsed[key]
    assert parsed == defaulted


@pytest.mark.parametrize("spec", AGREED_BAD, ids=[str(s) for s in AGREED_BAD])
def test_operator_spec_model_rejects_what_the_crd_rejects(spec):
    operator_spec = pytest.importorskip("slam_operator.spec")
    with pytest.raises(operator_spec.SpecError):
        operator_spec.parse_spec(copy.deepcopy(spec))
