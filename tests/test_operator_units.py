"""The operator's pure parts: spec model and defaults, failover planning, status, and `slam operator` flags."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml
from slam.cli import main
from slam_operator.failover import Create, Delete, NodeView, PodView, SlotMemory, plan
from slam_operator.pods import pod_manifest, services
from slam_operator.settings import server_settings
from slam_operator.spec import SLAMInferenceSpec, SpecError, parse_spec
from slam_operator.status import build_status, changes

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
READY = {"a": NodeView(True), "b": NodeView(True), "c": NodeView(True)}
CRD = Path(__file__).resolve().parents[1] / "manifests" / "crd.yaml"


def pod(name: str, slot: int, epoch: int = 0, node: str = "a", template: str = "t", **kw) -> PodView:
    return PodView(name, slot, epoch, phase=kw.pop("phase", "Running"), ready=kw.pop("ready", True), node=node,
                   template=template, **kw)


# --- spec --------------------------------------------------------------------------------------------------
def test_defaults_fill_an_empty_spec():
    spec = parse_spec({})
    assert (spec.image, spec.replicas, spec.model.source, spec.cache.policy, spec.cache.budget) == \
        ("slam-serve:cpu", 1, "embedded", "slam", 256)
    assert (spec.checkpoint.enabled, spec.server.port, spec.nodeFailureGraceSeconds) == (False, 8000, 60)
    assert parse_spec({"checkpoint": {"endpoint": "m:9000", "bucket": "b"}}).checkpoint.enabled is True


@pytest.mark.parametrize("raw, message", [
    ({"replicas": -1}, "spec.replicas: Input should be greater than or equal to 0"),
    ({"cache": {"budget": 68}}, "cache.budget (68) must be larger than cache.sink + cache.recent (4 + 64)"),
    ({"cache": {"policy": "lru"}}, "spec.cache.policy: Input should be"),
    ({"checkpoint": {"endpoint": "m:9000"}}, "checkpoint.bucket is required when checkpoint.enabled is true"),
    ({"checkpoint": {"bucket": "b"}}, "checkpoint.endpoint is required"),
    ({"replica": 2}, "spec.replica: Extra inputs are not permitted"),
    ({"server": {"port": 0}}, "spec.server.port: Input should be greater than or equal to 1"),
])
def test_bad_specs_name_the_field(raw, message):
    with pytest.raises(SpecError, match=None) as error:
        parse_spec(raw)
    assert message in str(error.value)


def test_full_policy_needs_no_budget_rule():
    assert parse_spec({"cache": {"policy": "full", "budget": 1}}).cache.budget == 1


@pytest.mark.skipif(not CRD.exists(), reason="manifests/crd.yaml is written on another branch")
def test_model_defaults_equal_the_crd_defaults():
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def walk(props: dict, model, path: str) -> None:
        for key, prop in props.items():
            value = getattr(model, key)
            default = prop.get("default")
            if isinstance(default, dict):  # e.g. checkpoint: {enabled: false} when the section is left out
                assert all(getattr(value, k) == v for k, v in default.items()), f"{path}{key}"
            elif "default" in prop:
                assert value == default, f"{path}{key}"
            if "properties" in prop and value is not None:  # the section's own defaults, as when written out
                walk(prop["properties"], type(value).model_construct(), f"{path}{key}.")

    walk(schema["properties"], SLAMInferenceSpec(), "spec.")


def test_settings_restore_only_after_the_first_epoch():
    spec = parse_spec({"checkpoint": {"endpoint": "m:9000", "bucket": "b"}})
    assert server_settings(spec, "x", "ns", 2, 0).restore_slot is None
    assert server_settings(spec, "x", "ns", 2, 3).restore_slot == 2
    assert server_settings(parse_spec({}), "x", "ns", 2, 3).restore_slot is None  # no store, nothing to restore


def test_rendered_pod_and_services_are_valid_kubernetes_objects():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    spec = parse_spec({
        "replicas": 2, "resources": {"gpus": 2, "cpu": 2, "memory": "8Gi"},
        "model": {"source": "/models/m.gguf", "pvcName": "models", "dtype": "bfloat16"},
        "checkpoint": {"endpoint": "minio:9000", "bucket": "slam", "secretRef": {"name": "s3"}},
        "server": {"apiKeySecretRef": {"name": "keys"}}, "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    pod = pod_manifest("llm", "ns", spec, 1, 2, avoid_nodes=("n1",), shun_nodes=("n2",))
    pod["metadata"]["name"] = "llm-1-abcde"  # what the API server makes of generateName
    for obj in [pod, *services("llm", "ns", spec)]:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


# --- planning ----------------------------------------------------------------------------------------------
def test_node_not_ready_within_grace_changes_nothing_and_after_it_fails_over():
    pods = [pod("p0", 0, node="a"), pod("p1", 1, node="b")]
    down = {**READY, "a": NodeView(False, NOW - datetime.timedelta(seconds=59))}
    assert plan(2, "t", pods, down, {}, NOW, grace=60).actions == []
    down["a"] = NodeView(False, NOW - datetime.timedelta(seconds=60))
    actions = plan(2, "t", pods, down, {0: SlotMemory(4)}, NOW, grace=60).actions
    assert actions == [Delete("p0", 0, "NodeFailure", force=True, failover=True,
                              message="node a not Ready for 60s or more", node="a"),
                       Create(0, 5, "NodeFailure", avoid_nodes=("a",))]


def test_failed_pod_is_replaced_at_the_next_epoch_and_its_node_shunned():
    failed = pod("p0", 0, epoch=2, phase="Failed", ready=False, reason="Evicted")
    actions = plan(1, "t", [failed], READY, {}, NOW, 60).actions
    assert [type(a).__name__ for a in actions] == ["Delete", "Create"]
    assert actions[0].force and actions[0].failover and actions[0].reason == "Evicted"
    assert actions[1] == Create(0, 3, "Evicted", shun_nodes=("a",))


def test_a_draining_pod_is_waited_for_and_its_slot_then_refilled():
    draining = [pod("p0", 0, deleting=True, ready=False)]
    assert plan(1, "t", draining, READY, {}, NOW, 60).actions == []
    assert plan(1, "t", [], READY, {0: SlotMemory(0, "Replacing")}, NOW, 60, drained=frozenset({0})).actions == \
        [Create(0, 1, "Updated")]
    assert plan(1, "t", [], READY, {0: SlotMemory(0, "Running")}, NOW, 60).actions == \
        [Create(0, 1, "PodGone", failover=True)]


def test_duplicates_keep_the_ready_highest_epoch():
    pods = [pod("old", 0, 1), pod("new", 0, 2), pod("cold", 0, 3, ready=False)]
    actions = plan(1, "t", pods, READY, {}, NOW, 60).actions
    assert sorted(a.pod for a in actions) == ["cold", "old"] and all(a.reason == "Duplicate" for a in actions)


def test_rolling_replacement_one_slot_at_a_time_only_when_all_ready():
    pods = [pod("p0", 0, template="old"), pod("p1", 1, template="old")]
    assert plan(2, "new", pods, READY, {}, NOW, 60).actions == [Delete("p0", 0, "Updating", message=(
        "the spec changed; the replacement restores what this pod checkpoints while it drains"))]
    pods[1] = pod("p1", 1, template="old", ready=False)
    assert plan(2, "new", pods, READY, {}, NOW, 60).actions == []


def test_scale_down_is_graceful_and_scale_up_continues_the_epoch():
    actions = plan(1, "t", [pod("p0", 0), pod("p1", 1)], READY, {}, NOW, 60).actions
    assert actions == [Delete("p1", 1, "ScaledDown", message="slot 1 is beyond spec.replicas")]
    removed = {1: SlotMemory(3, "Removed")}
    assert plan(2, "t", [pod("p0", 0)], READY, removed, NOW, 60).actions == [Create(1, 4, "ScaledUp")]


# --- status ------------------------------------------------------------------------------------------------
def test_status_conditions_and_quiet_passes():
    pods = [pod("p0", 0), pod("p1", 1, ready=False, phase="Pending", node=None)]
    first = build_status("llm", 3, 2, pods, {}, plan(2, "t", pods, READY, {}, NOW, 60), None, NOW)
    assert [first[k] for k in ("phase", "replicas", "readyReplicas", "observedGeneration")] == ["Pending", 2, 1, 3]
    kinds = {c["type"]: c for c in first["conditions"]}
    assert kinds["Ready"]["status"] == "False" and kinds["Progressing"]["reason"] == "Waiting"
    later = NOW + datetime.timedelta(minutes=1)
    again = build_status("llm", 3, 2, pods, {}, plan(2, "t", pods, READY, {}, later, 60), first, later)
    assert changes(first, again) == {}  # nothing changed: nothing to patch, transition times kept
    pods[1] = pod("p1", 1)
    done = build_status("llm", 3, 2, pods, {}, plan(2, "t", pods, READY, {}, later, 60), first, later)
    assert set(changes(first, done)) == {"phase", "readyReplicas", "slots", "conditions"}
    assert {c["type"]: c["status"] for c in done["conditions"]} == {"Ready": "True", "Progressing": "False",
                                                                     "Degraded": "False"}


# --- command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    ([], "--namespace NS or --all-namespaces"),
    (["--namespace", "a", "--all-namespaces"], "--all-namespaces"),
    (["--all-namespaces", "--liveness", "ftp://x"], "--liveness"),
    (["--all-namespaces", "--reconcile-seconds", "0"], "--reconcile-seconds"),
    (["--all-namespaces", "--priority", "high"], "--priority"),
    (["--all-namespaces", "--dev", "--peering", "p"], "--peering"),
])
def test_operator_flag_errors_exit_2_naming_the_flag(argv, flag, capsys):
    assert main(["operator", *argv]) == 2
    assert flag in capsys.readouterr().err
