"""The API server semantics tests/kube_emulator.py adds to kmock, checked over HTTP as clients see them."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from kube_fixtures import POD, SLAM
from operator_fixtures import k8s  # noqa: F401

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]
PODS = "/api/v1/namespaces/default/pods"


async def call(k8s, method: str, path: str, body=None, content_type="application/merge-patch+json"):
    async with aiohttp.ClientSession() as http, http.request(
            method, str(k8s.url).rstrip("/") + path, data=None if body is None else json.dumps(body),
            headers={"Content-Type": content_type}) as r:
        return r.status, await r.json()


async def test_metadata_generate_name_and_status_subresource(k8s):
    status, pod = await call(k8s, "POST", PODS, {"metadata": {"generateName": "p-"}, "spec": {"x": 1},
                                                 "status": {"phase": "Running"}}, "application/json")
    meta = pod["metadata"]
    assert status == 200 and meta["name"].startswith("p-") and len(meta["name"]) == 7
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert pod["status"] == {"phase": "Pending"}  # a client cannot create a status
    _, patched = await call(k8s, "PATCH", f"{PODS}/{meta['name']}", {"spec": {"x": 2}, "status": {"phase": "Failed"}})
    assert patched["status"]["phase"] == "Pending" and patched["metadata"]["generation"] == 2
    assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    both = {"spec": {"x": 3}, "status": {"phase": "Failed"}}
    _, patched = await call(k8s, "PATCH", f"{PODS}/{meta['name']}/status", both)
    assert (patched["status"]["phase"], patched["spec"]["x"]) == ("Failed", 2)
    test = [{"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]}]
    status, error = await call(k8s, "PATCH", f"{PODS}/{meta['name']}", test, "application/json-patch+json")
    assert (status, error["reason"]) == (422, "Invalid")
    stale = {"metadata": {"resourceVersion": meta["resourceVersion"]}}
    assert (await call(k8s, "PATCH", f"{PODS}/{meta['name']}", stale))[0] == 409


async def test_selectors_and_watch_replay(k8s):
    for name, labels in (("a", {"app": "x", "tier": "1"}), ("b", {"app": "x"}), ("c", {"app": "y"})):
        await k8s.put(POD, {"metadata": {"name": name, "namespace": "default", "labels": labels}, "spec": {}})
    names = lambda listing: sorted(i["metadata"]["name"] for i in listing["items"])  # noqa: E731
    assert names((await call(k8s, "GET", f"{PODS}?labelSelector=app%3Dx,!tier"))[1]) == ["b"]
    assert names((await call(k8s, "GET", f"{PODS}?labelSelector=app%20in%20(x,y),tier!%3D1"))[1]) == ["b", "c"]
    assert names((await call(k8s, "GET", f"{PODS}?fieldSelector=metadata.name%3Dc"))[1]) == ["c"]
    _, listing = await call(k8s, "GET", PODS)
    await k8s.remove(POD, "default", "a")  # between the list and the watch: the watch must still say so
    since = listing["metadata"]["resourceVersion"]
    async with aiohttp.ClientSession() as http, http.get(
            f"{str(k8s.url).rstrip('/')}{PODS}?watch=true&resourceVersion={since}") as r:
        line = b""
        while not line.strip():
            line = await asyncio.wait_for(r.content.readline(), 5)
        event = json.loads(line)
    assert (event["type"], event["object"]["metadata"]["name"]) == ("DELETED", "a")


async def test_graceful_pod_deletion_waits_for_the_kubelet(k8s):
    await k8s.put(POD, {"metadata": {"name": "p", "namespace": "default"}, "spec": {"nodeName": "node-a"}})
    await k8s.set_node_ready("node-a", False)
    await k8s.remove(POD, "default", "p")
    assert k8s.get(POD, "default", "p")["metadata"]["deletionTimestamp"]  # Terminating: nobody confirms
    await k8s.remove(POD, "default", "p", grace=0)
    assert k8s.get(POD, "default", "p") is None
    await k8s.put(SLAM, {"metadata": {"name": "s", "namespace": "default", "finalizers": ["f"]}, "spec": {}})
    await k8s.remove(SLAM, "default", "s")
    assert k8s.get(SLAM, "default", "s")["metadata"]["deletionTimestamp"]
    await k8s.patch(SLAM, "default", "s", {"metadata": {"finalizers": None}})
    assert k8s.get(SLAM, "default", "s") is None
