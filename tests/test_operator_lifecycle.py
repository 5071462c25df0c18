"""The operator over a resource's life: scaling, rolling spec changes, deletion through the finalizer (with
checkpoint objects on moto's S3), an operator restarted mid-failover, and two peered operators."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import sys
import uuid

import aiohttp
import pytest
import yaml
from minio import Minio

from kube_fixtures import PEERING, POD, SECRET, SERVICE, Kubelet
from operator_fixtures import (NAMESPACE, SLAM, by_slot, event_reasons, eventually, k8s, kubelet,  # noqa: F401
                               live_pods, one_ready_pod_per_slot, operator, slam_resource, status)
from s3_fixtures import free_port, s3_endpoint  # noqa: F401
from slam_operator.pods import TEMPLATE_ANNOTATION

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


def deletes_of(k8s, name: str) -> list:
    return [r for r in k8s if r.method == "DELETE" and r.resource == POD and r.name == name]


async def test_scale_two_three_one_and_back(k8s, kubelet):
    async with operator(k8s):
        await k8s.put(SLAM, slam_resource(replicas=2))
        two = await eventually(lambda: one_ready_pod_per_slot(k8s, 2), what="2 pods")
        await k8s.patch(SLAM, NAMESPACE, "llm", {"spec": {"replicas": 3}})
        three = await eventually(lambda: one_ready_pod_per_slot(k8s, 3), what="3 pods")
        assert {k: p["metadata"]["name"] for k, p in three.items() if k < 2} == \
            {k: p["metadata"]["name"] for k, p in two.items()}
        assert three[2]["metadata"]["labels"]["slam.dev/epoch"] == "0"
        await k8s.patch(SLAM, NAMESPACE, "llm", {"spec": {"replicas": 1}})
        one = await eventually(lambda: one_ready_pod_per_slot(k8s, 1), what="1 pod")
        await eventually(lambda: [s["phase"] for s in status(k8s).get("slots", [])][1:] == ["Removed", "Removed"],
                         what="slots 1 and 2 removed")
        assert (status(k8s)["replicas"], status(k8s)["readyReplicas"]) == (1, 1)
        assert one[0]["metadata"]["name"] == two[0]["metadata"]["name"]
        for slot in (1, 2):  # drained by SIGTERM: a graceful delete, never grace 0
            [delete] = deletes_of(k8s, three[slot]["metadata"]["name"])
            assert (delete.data or {}).get("gracePeriodSeconds") is None
        slots = {s["slot"]: s for s in status(k8s)["slots"]}
        assert (slots[1]["phase"], slots[2]["phase"]) == ("Removed", "Removed") and "pod" not in slots[1]
        # A slot that comes back continues its epochs: older checkpoints of the slot can never win a restore.
        await k8s.patch(SLAM, NAMESPACE, "llm", {"spec": {"replicas": 2}})
        again = await eventually(lambda: one_ready_pod_per_slot(k8s, 2), what="2 pods again")
    assert again[1]["metadata"]["labels"]["slam.dev/epoch"] == "1"
    assert status(k8s)["failovers"] == 0
    reasons = event_reasons(k8s)
    assert reasons.count("ScaledDown") == 2 and reasons.count("ScaledUp") == 1


async def test_spec_change_replaces_pods_one_at_a_time(k8s):
    k8s.graceful_pods = True  # a deleted pod stays Terminating until the kubelet has stopped it
    async with Kubelet(k8s, ready_delay=0.3), operator(k8s):
        await k8s.put(SLAM, slam_resource(replicas=3))
        old = await eventually(lambda: one_ready_pod_per_slot(k8s, 3), what="3 pods")
        template = old[0]["metadata"]["annotations"][TEMPLATE_ANNOTATION]
        await k8s.patch(SLAM, NAMESPACE, "llm", {"spec": {"server": {"maxBatch": 4}}})
        worst = 0
        while True:  # sample: at most one slot may be without a ready pod at any moment
            pods = one_ready_pod_per_slot(k8s, 3)
            if pods and all(p["metadata"]["annotations"][TEMPLATE_ANNOTATION] != template for p in pods.values()):
                break
            current = by_slot(live_pods(k8s))
            unready = [k for k in range(3) if not any(
                c["type"] == "Ready" and c["status"] == "True" for p in current.get(k, [])
                for c in p["status"].get("conditions", []))]
            worst = max(worst, len(unready))
            await asyncio.sleep(0.02)
    assert worst == 1
    versions = {(e["type"], e["object"]["metadata"]["name"]): v for v, r, e in k8s.history() if r == POD}
    for slot, pod in pods.items():
        # The successor is created only once the old pod has drained and is gone: it restores the drain's checkpoint.
        assert versions["ADDED", pod["metadata"]["name"]] > versions["DELETED", old[slot]["metadata"]["name"]]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["SLAM_MAX_BATCH"] == "4" and pod["metadata"]["labels"]["slam.dev/epoch"] == "1"
        [delete] = deletes_of(k8s, old[slot]["metadata"]["name"])  # graceful: the pod drains and checkpoints
        assert (delete.data or {}).get("gracePeriodSeconds") is None
    assert status(k8s)["failovers"] == 0
    assert event_reasons(k8s).count("Updating") == 3 and event_reasons(k8s).count("Updated") == 3


async def test_delete_cleans_up_pods_services_and_checkpoints(k8s, kubelet, s3_endpoint):
    endpoint, access, secret = s3_endpoint
    bucket, prefix = "slam-operator-test", f"ck-{uuid.uuid4().hex[:6]}"
    client = Minio(endpoint, access_key=access, secret_key=secret, secure=False)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    kept = [f"{prefix}/5/0/r/manifest.json", f"other-{prefix}/0/0/r/manifest.json"]
    doomed = [f"{prefix}/0/0/r1/manifest.json", f"{prefix}/0/1/.epoch.json", f"{prefix}/1/3/r2/tokens.safetensors"]
    for name in kept + doomed:
        client.put_object(bucket, name, io.BytesIO(b"x"), 1)
    await k8s.put(SECRET, {"metadata": {"name": "s3", "namespace": NAMESPACE}, "data": {
        "accessKey": base64.b64encode(access.encode()).decode(),
        "secretKey": base64.b64encode(secret.encode()).decode()}})
    checkpoint = {"endpoint": endpoint, "bucket": bucket, "prefix": prefix, "secretRef": {"name": "s3"},
                  "deleteOnCleanup": True}
    async with operator(k8s):
        await k8s.put(SLAM, slam_resource(replicas=2, checkpoint=checkpoint))
        await eventually(lambda: one_ready_pod_per_slot(k8s, 2), what="2 pods")
        assert "slam.dev/cleanup" in k8s.get(SLAM, NAMESPACE, "llm")["metadata"]["finalizers"]
        await k8s.remove(SLAM, NAMESPACE, "llm")
        await eventually(lambda: k8s.get(SLAM, NAMESPACE, "llm") is None, what="the resource to go")
    assert not k8s.pods(NAMESPACE) and not k8s.list(SERVICE, NAMESPACE)
    left = {o.object_name for p in (prefix, f"other-{prefix}")
            for o in client.list_objects(bucket, p + "/", recursive=True)}
    assert left == set(kept)
    assert "CheckpointsDeleted" in event_reasons(k8s)


async def test_restart_in_the_middle_of_a_failover_ends_with_one_pod_per_slot(k8s, kubelet):
    async with operator(k8s):
        await k8s.put(SLAM, slam_resource(replicas=2))
        before = await eventually(lambda: one_ready_pod_per_slot(k8s, 2), what="2 pods")
        failed = before[0]["metadata"]["name"]
        await kubelet.set_phase(before[0], "Failed", exit_code=1)
        await eventually(lambda: k8s.get(POD, NAMESPACE, failed) is None, what="the failed pod deleted")
    # Stopped right after the delete. While no operator runs, a stray replacement of slot 1 appears too, as
    # if an operator had created it and died before recording it anywhere.
    stray = dict(before[1], metadata={**before[1]["metadata"], "name": None, "generateName": "llm-1-",
                                      "labels": {**before[1]["metadata"]["labels"], "slam.dev/epoch": "1"}})
    stray.pop("status")
    stray = await k8s.put(POD, stray)
    async with operator(k8s):
        after = await eventually(lambda: one_ready_pod_per_slot(k8s, 2), what="one pod per slot")
        await asyncio.sleep(0.6)  # a few more passes change nothing
        assert one_ready_pod_per_slot(k8s, 2) == after
    assert after[0]["metadata"]["labels"]["slam.dev/epoch"] == "1"
    assert after[1]["metadata"]["name"] == stray["metadata"]["name"]  # the highest epoch owns the slot
    assert [s["epoch"] for s in status(k8s)["slots"]] == [1, 1]
    assert status(k8s)["failovers"] >= 1 and "Duplicate" in event_reasons(k8s)


async def test_peered_operators_act_once_and_take_over(k8s, kubelet):
    await k8s.put(PEERING, {"metadata": {"name": "slam", "namespace": NAMESPACE}})
    async with operator(k8s, peering_name="slam", priority=100, identity="standby", thread=True):
        async with operator(k8s, peering_name="slam", priority=200, identity="active", thread=True):
            await asyncio.sleep(1.0)  # the two see each other; the lower priority pauses
            await k8s.put(SLAM, slam_resource(replicas=2))
            await eventually(lambda: one_ready_pod_per_slot(k8s, 2), what="2 pods")
            await asyncio.sleep(1.0)
            creates = [r for r in k8s if r.method == "POST" and r.resource == POD]
            assert len(creates) == 2
        # The active operator left the peering; the standby resumes and handles a failure.
        before = one_ready_pod_per_slot(k8s, 2)
        await kubelet.set_phase(before[1], "Failed", exit_code=1)
        after = await eventually(lambda: (p := one_ready_pod_per_slot(k8s, 2)) and
                                 p[1]["metadata"]["name"] != before[1]["metadata"]["name"] and p, what="takeover")
    assert after[1]["metadata"]["labels"]["slam.dev/epoch"] == "1"


async def test_slam_operator_command_runs_against_a_kubeconfig(k8s, kubelet, tmp_path):
    """The real entry point: flags, kubeconfig credentials, kopf.run, liveness, quiet logs, SIGTERM."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "users": [{"name": "emu", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}]}))
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "slam.cli", "operator", "--namespace", NAMESPACE, "--reconcile-seconds", "0.3",
        "--liveness", f"http://127.0.0.1:{port}/healthz", "--dev",
        env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        await k8s.put(SLAM, slam_resource(replicas=2))
        await eventually(lambda: one_ready_pod_per_slot(k8s, 2), timeout=30, what="2 pods from `slam operator`")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
        assert all(r.headers.get("Authorization") == "Bearer t0ken" for r in k8s if r.method == "POST")
    finally:
        process.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(process.communicate(), 20))[0].decode()
    assert process.returncode == 0, output
    assert "slot 1: created pod" in output and "Timer 'reconcile' succeeded" not in output
