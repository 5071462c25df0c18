"""The operator in kopf's real runtime against kmock's emulated API server (tests/kube_fixtures.py):
creation, the pod's rendered spec, failover of failed pods and dead nodes, bad specs."""

from __future__ import annotations

import asyncio
import base64
import os

import aiohttp
import pytest

from kube_fixtures import POD, SECRET, SERVICE
from operator_fixtures import (NAMESPACE, SLAM, condition, event_reasons, eventually, k8s, kubelet,  # noqa: F401
                               live_pods, one_ready_pod_per_slot, operator, slam_resource, status)
from s3_fixtures import free_port
from slam.config import ServerSettings
from slam_operator.pods import TEMPLATE_ANNOTATION

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
CHECKPOINT = {"endpoint": "minio.slam.svc:9000", "bucket": "slam-ckpt", "prefix": "ck", "intervalTokens": 8,
              "maxAgeSeconds": 600, "secretRef": {"name": "s3"}}


def env_of(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def settings_from_env(pod: dict, monkeypatch) -> ServerSettings:
    """What `slam serve` reads in this pod: its env, with the Secret-backed credentials filled in."""
    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.startswith("SLAM_")]:
            m.delenv(name)
        for name, e in env_of(pod).items():
            if name != "SLAM_API_KEY_FILE":
                m.setenv(name, e.get("value", "from-secret"))
        return ServerSettings()


async def test_two_replicas_pods_services_status(k8s, kubelet, monkeypatch):
    port = free_port()
    spec = dict(replicas=2, nodeFailureGraceSeconds=45, cache={"policy": "streaming", "budget": 200},
                server={"port": 8100, "maxBatch": 4, "apiKeySecretRef": {"name": "keys"}, "asyncScheduling": "off",
                        "enforceEager": True},
                resources={"gpus": 1, "memory": "4Gi"}, checkpoint=CHECKPOINT,
                tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}])
    async with operator(k8s, liveness=f"http://127.0.0.1:{port}/healthz"):
        owner = await k8s.put(SLAM, slam_resource(**spec))
        pods = await eventually(lambda: one_ready_pod_per_slot(k8s, 2), what="one ready pod per slot")
        await eventually(lambda: status(k8s).get("phase") == "Running", what="phase Running")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
    for slot, pod in pods.items():
        meta, pod_spec = pod["metadata"], pod["spec"]
        assert meta["name"].startswith(f"llm-{slot}-") and len(meta["name"]) == len(f"llm-{slot}-") + 5
        assert meta["labels"] == {"app.kubernetes.io/name": "slam", "app.kubernetes.io/instance": "llm",
                                  "slam.dev/slot": str(slot), "slam.dev/epoch": "0"}
        assert [o["uid"] for o in meta["ownerReferences"]] == [owner["metadata"]["uid"]]
        assert (pod_spec["hostname"], pod_spec["subdomain"], pod_spec["restartPolicy"]) == \
            (f"llm-{slot}", "llm-pods", "Never")
        tolerations = {t["key"]: t for t in pod_spec["tolerations"]}
        assert tolerations["gpu"]["effect"] == "NoSchedule"
        for taint in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
            assert tolerations[taint] == {"key": taint, "operator": "Exists", "effect": "NoExecute",
                                          "tolerationSeconds": 45}
        server = pod_spec["containers"][0]
        assert server["resources"] == {"requests": {"memory": "4Gi"},
                                       "limits": {"memory": "4Gi", "nvidia.com/gpu": "1"}}
        assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert server["livenessProbe"]["httpGet"]["path"] == "/health"
        env = env_of(pod)
        assert env["SLAM_S3_SECRET_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "secretKey"}}
        assert env["SLAM_API_KEY_FILE"]["value"] == "/etc/slam/api-key/apiKey"
        assert "SLAM_RESTORE_SLOT" not in env  # the first pod of a slot has nothing to restore
        # The env round-trips through the server's own settings class.
        got = settings_from_env(pod, monkeypatch)
        assert (got.host, got.port, got.policy, got.budget, got.max_batch, got.slot, got.slot_epoch) == \
            ("0.0.0.0", 8100, "streaming", 200, 4, slot, 0)
        assert (got.s3_endpoint, got.s3_bucket, got.s3_prefix, got.checkpoint_interval, got.restore_slot) == \
            ("minio.slam.svc:9000", "slam-ckpt", "ck", 8, None)
        assert got.checkpoint_max_age == 600  # checkpoint.maxAgeSeconds reaches the server
        assert (got.async_scheduling, got.enforce_eager) == ("off", True)
        assert got.advertise_url == f"http://llm-{slot}.llm-pods.{NAMESPACE}.svc.cluster.local:8100"
        assert got.s3_access_key.get_secret_value() == "from-secret"
    services = {s["metadata"]["name"]: s for s in k8s.list(SERVICE, NAMESPACE)}
    selector = {"app.kubernetes.io/name": "slam", "app.kubernetes.io/instance": "llm"}
    assert services["llm"]["spec"]["selector"] == selector and services["llm"]["spec"]["type"] == "ClusterIP"
    assert services["llm"]["spec"]["ports"] == [{"name": "http", "port": 8100, "targetPort": "http", "protocol": "TCP"}]
    assert services["llm-pods"]["spec"]["clusterIP"] == "None"
    assert services["llm-pods"]["spec"]["publishNotReadyAddresses"] is True
    final = status(k8s)
    assert (final["replicas"], final["readyReplicas"], final["failovers"]) == (2, 2, 0)
    assert final["selector"] == "app.kubernetes.io/name=slam,app.kubernetes.io/instance=llm"
    assert final["observedGeneration"] == 1
    assert [(s["slot"], s["pod"], s["epoch"], s["ready"]) for s in final["slots"]] == \
        [(k, pods[k]["metadata"]["name"], 0, True) for k in (0, 1)]
    assert all(s["node"] == pods[s["slot"]]["spec"]["nodeName"] for s in final["slots"])
    assert condition(k8s, "Ready")["status"] == "True" and condition(k8s, "Degraded")["status"] == "False"
    assert event_reasons(k8s).count("Created") == 2


@pytest.mark.parametrize("reason", [None, "Evicted"])
async def test_failed_pod_is_replaced_at_next_epoch_with_restore(k8s, kubelet, reason):
    async with operator(k8s):
        await k8s.put(SLAM, slam_resource(replicas=2, checkpoint=CHECKPOINT))
        before = await eventually(lambda: one_ready_pod_per_slot(k8s, 2), what="two ready pods")
        failed = before[1]
        await kubelet.set_phase(failed, "Failed", reason=reason, exit_code=None if reason else 137)
        after = await eventually(lambda: (p := one_ready_pod_per_slot(k8s, 2)) and
                                 p[1]["metadata"]["name"] != failed["metadata"]["name"] and p, what="replacement")
        await eventually(lambda: status(k8s).get("phase") == "Running", what="Running again")
    assert k8s.get(POD, NAMESPACE, failed["metadata"]["name"]) is None
    assert after[0]["metadata"]["name"] == before[0]["metadata"]["name"]  # the healthy slot is untouched
    new = after[1]
    assert new["metadata"]["labels"]["slam.dev/epoch"] == "1" and new["metadata"]["labels"]["slam.dev/slot"] == "1"
    env = env_of(new)
    assert [env[k]["value"] for k in ("SLAM_SLOT", "SLAM_SLOT_EPOCH", "SLAM_RESTORE_SLOT")] == ["1", "1", "1"]
    # The failed pod's node is avoided where another node fits (preferred, so a one-node cluster still works).
    preferred = new["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["preference"]["matchExpressions"][0]["values"] == [failed["spec"]["nodeName"]]
    assert new["spec"]["nodeName"] != failed["spec"]["nodeName"]
    final = status(k8s)
    assert final["failovers"] == 1 and [s["epoch"] for s in final["slots"]] == [0, 1]
    reasons = event_reasons(k8s)
    assert "Failover" in reasons and ("Evicted" if reason else "PodFailed") in reasons


async def test_node_not_ready_fails_over_only_after_the_grace(k8s, kubelet):
    grace = 3
    async with operator(k8s):
        await k8s.put(SLAM, slam_resource(replicas=2, nodeFailureGraceSeconds=grace, checkpoint=CHECKPOINT))
        before = await eventually(lambda: one_ready_pod_per_slot(k8s, 2), what="two ready pods")
        dead = before[0]["spec"]["nodeName"]
        await k8s.set_node_ready(dead, False)
        # Within the grace nothing changes: a node that comes back keeps its pods (several reconcile passes).
        await asyncio.sleep(grace / 2)
        assert {p["metadata"]["name"] for p in live_pods(k8s)} == {p["metadata"]["name"] for p in before.values()}
        assert status(k8s)["failovers"] == 0
        after = await eventually(lambda: (p := one_ready_pod_per_slot(k8s, 2)) and
                                 p[0]["metadata"]["name"] != before[0]["metadata"]["name"] and p, what="failover")
    assert k8s.get(POD, NAMESPACE, before[0]["metadata"]["name"]) is None  # force-deleted, not left Terminating
    deletes = [r for r in k8s if r.method == "DELETE" and r.name == before[0]["metadata"]["name"]]
    assert deletes and deletes[0].data.get("gracePeriodSeconds") == 0
    new = after[0]
    required = new["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["nodeSelectorTerms"] == [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [dead]}]}]
    assert new["spec"]["nodeName"] != dead and new["metadata"]["labels"]["slam.dev/epoch"] == "1"
    assert env_of(new)["SLAM_RESTORE_SLOT"]["value"] == "0"
    assert after[1]["metadata"]["name"] == before[1]["metadata"]["name"]
    assert status(k8s)["failovers"] == 1
    assert {"NodeFailure", "Failover"} <= set(event_reasons(k8s))


async def test_node_not_ready_within_a_long_grace_changes_nothing(k8s, kubelet):
    async with operator(k8s):
        await k8s.put(SLAM, slam_resource(replicas=1, nodeFailureGraceSeconds=60))
        before = await eventually(lambda: one_ready_pod_per_slot(k8s, 1), what="a ready pod")
        await k8s.set_node_ready(before[0]["spec"]["nodeName"], False)
        await asyncio.sleep(1.5)
        assert [p["metadata"]["name"] for p in live_pods(k8s)] == [before[0]["metadata"]["name"]]
        assert not [r for r in k8s if r.method == "DELETE"]
        assert status(k8s)["failovers"] == 0


async def test_bad_spec_is_failed_with_a_message_until_fixed(k8s, kubelet):
    async with operator(k8s):
        await k8s.put(SLAM, slam_resource(replicas=1, cache={"budget": 60}, checkpoint={"enabled": True}))
        await eventually(lambda: status(k8s).get("phase") == "Failed", what="phase Failed")
        message = condition(k8s, "Ready")["message"]
        assert "cache.budget (60) must be larger than cache.sink + cache.recent" in message
        assert "checkpoint.bucket is required" in message
        await asyncio.sleep(0.6)
        assert not k8s.pods(NAMESPACE) and "InvalidSpec" in event_reasons(k8s)
        await k8s.patch(SLAM, NAMESPACE, "llm", {"spec": {"cache": {"budget": 128}, "checkpoint": None}})
        await eventually(lambda: one_ready_pod_per_slot(k8s, 1), what="a pod once the spec is fixed")
        await eventually(lambda: status(k8s).get("phase") == "Running", what="Running")


async def test_s3_credentials_are_referenced_not_copied(k8s, kubelet):
    await k8s.put(SECRET, {"metadata": {"name": "s3", "namespace": NAMESPACE}, "data": {
        "accessKey": base64.b64encode(b"AK").decode(), "secretKey": base64.b64encode(b"SK").decode()}})
    async with operator(k8s):
        await k8s.put(SLAM, slam_resource(replicas=1, checkpoint=CHECKPOINT))
        pods = await eventually(lambda: one_ready_pod_per_slot(k8s, 1), what="a pod")
    assert "AK" not in repr(pods[0]) and TEMPLATE_ANNOTATION in pods[0]["metadata"]["annotations"]
    env = kubelet.container_env(pods[0])  # what the server process gets
    assert (env["SLAM_S3_ACCESS_KEY"], env["SLAM_S3_SECRET_KEY"], env["SLAM_SLOT"]) == ("AK", "SK", "0")
