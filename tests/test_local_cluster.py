"""The whole failover story on one machine: the real operator (kopf's runtime) against kmock's emulated API
server, a kubelet stand-in that runs each pod as a real `slam serve` process (tests/kubelet.py), moto's S3.

Two replicas serve four greedy streams. Slot 1's server is killed (its pod goes Failed); slot 0's node goes
NotReady, its server stalled as behind a partition. The operator replaces both pods at epoch 1 with
--restore-slot; the new servers restore the checkpoints; every client resumes with Last-Event-ID at an address
the Service gives and gets its whole token sequence exactly once, equal to an uninterrupted run. The stalled
server then runs on, writing epoch 0 with newer objects than epoch 1's: restores and resumes are unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import uuid

import httpx
import pytest

from api_fixtures import MODEL
from kube_fixtures import SECRET
from kubelet import ProcessKubelet
from operator_fixtures import (NAMESPACE, SLAM, event_reasons, eventually, k8s, one_ready_pod_per_slot,  # noqa: F401
                               operator, slam_resource, status)
from s3_fixtures import s3_endpoint  # noqa: F401  (fixture)
from slam.checkpoint import ObjectStore, latest_epoch, load_slot
from slam.checkpoint import format as fmt
from slam.checkpoint.store import CheckpointConfig
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams
from slam_operator.spec import ModelSpec

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(400)]
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request lines

MAX_TOKENS, CUT_AT, GRACE = 80, 12, 2
BUDGET, SINK, RECENT = 24, 4, 8  # the prompts overflow the budget: reserve segments cross the epochs
PROMPTS = ["Tell me about the sea.", "List some colors.", "Why is the sky blue?", "Write a short poem."]
START_S = 240  # model loads of two servers at once on two busy cores


class Client:
    """One streaming chat request: reads CUT_AT tokens, then stops reading (its server fails meanwhile), and
    later resumes elsewhere with Last-Event-ID."""

    def __init__(self, url: str, prompt: str):
        self.body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                     "stream": True, "ignore_eos": True, "temperature": 0.0}
        self.request_id, self.before, self.after, self.owner, self.done, self.restore = "", [], [], "", False, {}
        self.release = threading.Event()
        threading.Thread(target=self._run, args=(url,), daemon=True).start()

    def _run(self, url: str) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=self.body, timeout=300) as r:
                lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
                for line in lines:
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        self.request_id = chunk["id"]
                        self.before.append(chunk["choices"][0]["delta"].get("content", ""))
                        if len(self.before) == CUT_AT:
                            break
                self.release.wait(600)
        except httpx.HTTPError:
            pass

    def resume(self, url: str) -> None:
        headers = {"Last-Event-ID": str(len(self.before) - 1)}
        with httpx.stream("GET", f"{url}/v1/requests/{self.request_id}/stream", headers=headers, timeout=300) as r:
            assert r.status_code == 200, r.read()
            self.owner = r.headers.get("x-slam-owner", url)
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.after.append(json.loads(line[6:]))
                self.done |= line == "data: [DONE]"
        self.restore = httpx.get(f"{self.owner}/v1/requests/{self.request_id}", timeout=30).json().get("restore")


def uninterrupted(loaded) -> list[tuple[list[int], str]]:
    # The servers run the operator's default model.dtype ("auto": int8 weights on this CPU).
    engine = LLMEngine(EngineConfig(cache=CacheConfig(policy="slam", budget=BUDGET, sink=SINK, recent=RECENT),
                                    dtype=ModelSpec().dtype), loaded=loaded)
    seqs = [engine.add_request(engine.encode_chat([{"role": "user", "content": p}]),
                               SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0))
            for p in PROMPTS]
    while engine.has_work():
        engine.step()
    return [(list(s.output_ids), s.output_text) for s in seqs]


async def test_two_failures_clients_resume_exactly_once(k8s, s3_endpoint, smol, tmp_path):  # noqa: F811
    endpoint, access, secret = s3_endpoint
    prefix = f"lc-{uuid.uuid4().hex[:6]}"
    store = ObjectStore(CheckpointConfig(endpoint=endpoint, bucket="slam-lc", prefix=prefix, access_key=access,
                                         secret_key=secret))
    keys = {"accessKey": access, "secretKey": secret}
    await k8s.put(SECRET, {"metadata": {"name": "s3", "namespace": NAMESPACE},
                           "data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}})
    spec = dict(replicas=2, nodeFailureGraceSeconds=GRACE, cache={"budget": BUDGET, "sink": SINK, "recent": RECENT},
                checkpoint={"endpoint": "minio.slam.svc:9000", "bucket": "slam-lc", "prefix": prefix,
                            "intervalTokens": 8, "secretRef": {"name": "s3"}})
    reference = asyncio.create_task(asyncio.to_thread(uninterrupted, smol))
    async with ProcessKubelet(k8s, endpoint, tmp_path) as kubelet, operator(k8s):
        await k8s.put(SLAM, slam_resource(**spec))
        first = await eventually(lambda: one_ready_pod_per_slot(k8s, 2), START_S, "two ready servers")
        urls = kubelet.service_urls()
        clients = [Client(urls[i % 2], p) for i, p in enumerate(PROMPTS)]
        await eventually(lambda: all(len(c.before) == CUT_AT for c in clients), 120, "clients at the cut")
        stored = {c.request_id: i % 2 for i, c in enumerate(clients)}
        await eventually(lambda: all(_manifest(store, prefix, slot, 0, rid) for rid, slot in stored.items()), 60,
                         "epoch 0 holds every request")

        # Slot 1's server dies; slot 0's node goes NotReady with its server stalled (partitioned).
        kubelet.kill(first[1]["metadata"]["name"])
        (stalled,) = await kubelet.node_down(first[0]["spec"]["nodeName"], freeze=True)
        after = await eventually(lambda: (p := one_ready_pod_per_slot(k8s, 2)) and all(
            q["metadata"]["labels"]["slam.dev/epoch"] == "1" for q in p.values()) and p, START_S, "both replaced")
        assert after[0]["spec"]["nodeName"] != first[0]["spec"]["nodeName"]
        assert latest_epoch(store, 0) == latest_epoch(store, 1) == 1
        owners = {slot: kubelet.url_of(slot) for slot in (0, 1)}

        # The partition heals for the stalled server alone: it writes epoch 0 on, newer than epoch 1.
        kubelet.thaw(stalled.node)
        stalled_rid = next(rid for rid, slot in stored.items() if slot == 0)
        epoch1 = _manifest(store, prefix, 0, 1, stalled_rid)
        await eventually(lambda: (m := _manifest(store, prefix, 0, 0, stalled_rid)) and
                         m["created_unix"] > epoch1["created_unix"] and
                         m["counts"]["output_tokens"] > epoch1["counts"]["output_tokens"], 60, "old server writes")

        # A restore now returns epoch 1's lineage, and owner lookups name the new servers.
        assert all(r.manifest["epoch"] == 1 and r.owner_url == owners[0] for r in load_slot(store, 0))

        # Each client resumes at the Service, which sends it to either pod (the other one proxies).
        service = kubelet.service_urls()
        threads = [threading.Thread(target=c.resume, args=(service[i % 2],)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        await asyncio.to_thread(lambda: [t.join(240) for t in threads])
        # Finished at epoch 1, the requests leave the store for good, whatever the stalled server still writes
        # at epoch 0.
        await eventually(lambda: not load_slot(store, 0) and not load_slot(store, 1), 30, "finished requests gone")
        assert stalled.proc.poll() is None
        final = status(k8s)
        for c in clients:
            c.release.set()
    for c, (ids, text) in zip(clients, await reference):
        assert c.done and c.owner == owners[stored[c.request_id]]
        assert c.restore == {**c.restore, "status": "exact", "epoch": 0}  # from the checkpoint, with its cache
        assert [ch["index"] for ch in c.after] == list(range(CUT_AT, MAX_TOKENS))
        assert [ch["token_id"] for ch in c.after] == ids[CUT_AT:]
        assert "".join(c.before) + "".join(ch["text"] for ch in c.after) == text
    assert final["failovers"] == 2 and [(s["slot"], s["epoch"]) for s in final["slots"]] == [(0, 1), (1, 1)]
    assert {"Failover", "NodeFailure", "PodFailed"} <= set(event_reasons(k8s))


def _manifest(store: ObjectStore, prefix: str, slot: int, epoch: int, rid: str) -> dict | None:
    """The newest manifest of `rid` at `slot`/`epoch`, read straight from the store."""
    root = fmt.request_dir(prefix, slot, rid, epoch)
    names = sorted(n for n in store.list(root) if n.endswith(fmt.MANIFEST))
    for name in reversed(names):
        try:
            return fmt.decode_manifest(store.get(name))
        except Exception:  # deleted between list and get
            continue
    return None
