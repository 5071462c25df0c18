"""Fencing by epoch (design.md section 3), end to end: real `slam serve` processes, the real model, S3.

A (slot 0, epoch 0) serves four streams: it plays a pod cut off from the cluster, that stalls while B restores its
slot and then goes on generating and writing its epoch. B restores slot 0 at epoch 1 and dies. C restores at epoch 2:
it must get B's lineage (the epoch-1 checkpoints), not A's newer epoch-0 objects, and a request A started after B's
claim must not come back. Clients resume at C, directly or through D (slot 1), which must find C as the owner. A
server whose epoch is not above the slot's claimed one refuses to start with exit code 2.

Before that, the same rules at the library level (a tiny random model, no servers): an epoch counts only
once claimed, a claimed epoch shadows older ones even when they are newer or it holds no request, and
a restored request's write-once objects are copied into the new epoch on the store's side, and an old
pod's checkpoint collector never takes a newer epoch's requests for garbage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from api_fixtures import MODEL, SERVER_DTYPE, free_port, serve_command, server_env
from s3_fixtures import make_config, s3_endpoint  # noqa: F401  (fixture)
from slam.api.janitor import collect
from slam.api.proxy import find_owner
from slam.checkpoint import Checkpointer, ObjectStore, latest_epoch, load_slot
from slam.checkpoint import format as fmt
from slam.checkpoint.store import CheckpointConfig
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams

logging.getLogger("werkzeug").setLevel(logging.ERROR)

MAX_TOKENS, CUT_AT = 48, 12
PROMPTS = ["Tell me about the sea.", "List some colors.", "Why is the sky blue?", "Write a short poem."]
ARGS = ["--budget", "24", "--sink", "4", "--recent", "8", "--max-batch", "8", "--checkpoint-interval", "8"]


def test_claimed_epoch_shadows_older_ones(tiny, s3_endpoint):  # noqa: F811
    cfg0 = make_config(*s3_endpoint, advertise_url="http://old", interval_tokens=4)
    cfg1 = cfg0.model_copy(update={"epoch": 1, "advertise_url": "http://new"})
    store = ObjectStore(cfg0)
    engine = LLMEngine(EngineConfig(cache=CacheConfig(policy="slam", budget=12, sink=2, recent=4), dtype=SERVER_DTYPE),
                       loaded=tiny)
    seq = engine.add_request(list(range(5, 25)), SamplingParams(max_tokens=40, ignore_eos=True))
    old = Checkpointer(store, cfg0)
    for _ in range(6):
        engine.step()
    assert old.checkpoint(seq) and old.flush(30)

    # The new pod stores what it took over at epoch 1, but until it claims the epoch, epoch 0 is in charge.
    new = Checkpointer(store, cfg1, claim=False)
    (r,) = load_slot(store, 0)
    assert r.status == "exact" and r.reserve[0]["n"] > 0 and r.manifest["epoch"] == 0
    assert new.adopt(r.request_id, r.store_state(), source=fmt.request_dir(cfg0.prefix, 0, r.request_id, 0))
    assert new.checkpoint(seq) and new.flush(30)
    assert latest_epoch(store, 0) == 0 and find_owner(store, seq.request_id) == "http://old"
    assert new.claim(timeout=30) and latest_epoch(store, 0) == 1
    (r1,) = load_slot(store, 0)
    assert (r1.status, r1.manifest["epoch"], r1.output_ids) == ("exact", 1, r.output_ids)
    assert set(new.last_upload[seq.request_id]) == {"tokens", "state", "manifest"}  # prompt, segments: copied

    # The old pod writes on, newer in time and further along: restores and owner lookups do not see it.
    for _ in range(8):
        engine.step()
    assert old.checkpoint(seq) and old.flush(30)
    (r2,) = load_slot(store, 0)
    assert r2.manifest["epoch"] == 1 and r2.output_ids == r1.output_ids
    assert find_owner(store, seq.request_id) == "http://new"
    # Finished at epoch 1: gone for good, although epoch 0 still has it.
    new.delete_request(seq.request_id)
    assert new.flush(30) and load_slot(store, 0) == [] and load_slot(store, 0, epoch=0) != []
    assert find_owner(store, seq.request_id) is None
    old.close()
    new.close()


def test_an_old_pods_collector_leaves_newer_epochs_alone(tiny, s3_endpoint):  # noqa: F811
    cfg0 = make_config(*s3_endpoint)
    cfg1 = cfg0.model_copy(update={"epoch": 1})
    store = ObjectStore(cfg0)
    engine = LLMEngine(EngineConfig(cache=CacheConfig(policy="slam", budget=12, sink=2, recent=4), dtype=SERVER_DTYPE),
                       loaded=tiny)
    seqs = [engine.add_request(list(range(5, 25)), SamplingParams(max_tokens=40, ignore_eos=True)) for _ in range(2)]
    engine.step()
    for cfg, seq in zip((cfg0, cfg1), seqs):
        ckpt = Checkpointer(store, cfg)
        assert ckpt.checkpoint(seq) and ckpt.flush(30)
        ckpt.close()
    old, new = (fmt.request_dir(cfg0.prefix, 0, s.request_id, e) for e, s in enumerate(seqs))
    # The epoch-0 pod holds neither request live, yet collects only its own epoch.
    assert collect(store, 0, live=set(), max_age_s=3600, orphan_grace_s=0, epoch=0)["requests"] == 1
    assert not store.list(old) and store.list(new)
    assert collect(store, 0, live={seqs[1].request_id}, max_age_s=3600, orphan_grace_s=0, epoch=1)["requests"] == 0
    assert store.list(new)


def test_a_second_pod_at_the_same_epoch_is_fenced(tiny, s3_endpoint):  # noqa: F811
    """Two checkpointers claim one slot and epoch (a fresh pod while a partitioned one still runs): the
    conditional write of the claim lets one win; the other writes nothing, and says why."""
    cfg = make_config(*s3_endpoint, advertise_url="http://first")
    store = ObjectStore(cfg)
    first = Checkpointer(store, cfg)
    assert first.flush(30) and first.claimed and not first.fenced
    second = Checkpointer(ObjectStore(cfg), cfg.model_copy(update={"advertise_url": "http://second"}))
    assert second.flush(30) and not second.claimed
    assert "http://first" in second.fenced and first.instance in second.fenced
    marker = fmt.epoch_dir(cfg.prefix, 0, 0) + fmt.EPOCH_MARKER
    assert fmt.decode_manifest(store.get(marker))["owner_url"] == "http://first"
    before = set(store.list(fmt.epoch_dir(cfg.prefix, 0, 0)))
    engine = LLMEngine(EngineConfig(cache=CacheConfig(policy="slam", budget=12, sink=2, recent=4), dtype=SERVER_DTYPE),
                       loaded=tiny)
    seq = engine.add_request(list(range(5, 25)), SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    assert not second.checkpoint(seq)  # refused: nothing is queued
    second.delete_request("anything")  # queued work is dropped too
    assert second.flush(30) and set(store.list(fmt.epoch_dir(cfg.prefix, 0, 0))) == before
    assert first.checkpoint(seq) and first.flush(30) and len(store.list(fmt.epoch_dir(cfg.prefix, 0, 0))) > len(before)
    # A retried claim whose first write went through (its answer lost) is still the same instance's.
    assert first.claim(timeout=30) and not first.fenced
    first.close()
    second.close()


class Servers:
    """`slam serve` processes on one S3 prefix."""

    def __init__(self, s3: tuple[str, str, str], tmp: Path):
        self.endpoint, access, secret = s3
        self.prefix = f"fence-{uuid.uuid4().hex[:6]}"
        self.env = {**server_env(), "SLAM_S3_ACCESS_KEY": access, "SLAM_S3_SECRET_KEY": secret}
        self.tmp, self.procs = tmp, []
        self.store = ObjectStore(CheckpointConfig(endpoint=self.endpoint, bucket="slam", prefix=self.prefix,
                                                  access_key=access, secret_key=secret))

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        cmd = serve_command("--port", str(port), "--s3-endpoint", self.endpoint, "--s3-prefix", self.prefix,
                            *ARGS, *args)
        with open(self.tmp / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    def wait_ready(self, name: str, proc: subprocess.Popen, url: str) -> None:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (self.tmp / f"{name}.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return
            assert time.monotonic() < deadline, (self.tmp / f"{name}.log").read_text()[-3000:]
            time.sleep(0.2)

    def refused(self, runs: list[list[str]]) -> list[str]:
        """Start servers (at once) that must refuse to start; returns their stderr."""
        procs = [subprocess.Popen(serve_command("--port", str(free_port()), "--s3-endpoint", self.endpoint,
                                                "--s3-prefix", self.prefix, *ARGS, *args),
                                  env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for args in runs]
        errs = [p.communicate(timeout=120)[1] for p in procs]
        for p, err in zip(procs, errs):
            assert p.returncode == 2, err[-3000:]
        return errs

    def manifests(self, epoch: int) -> dict[str, dict]:
        """Newest manifest of each request of slot 0 at `epoch`, read straight from the store."""
        out: dict[str, dict] = {}
        for name in self.store.list(fmt.epoch_dir(self.prefix, 0, epoch)):
            if name.endswith(fmt.MANIFEST):
                with contextlib.suppress(Exception):  # deleted between list and get
                    m = fmt.decode_manifest(self.store.get(name))
                    if m["version"] >= out.get(m["request_id"], {}).get("version", 0):
                        out[m["request_id"]] = m
        return out

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def servers(s3_endpoint, tmp_path):  # noqa: F811
    s = Servers(s3_endpoint, tmp_path)
    yield s
    s.stop()


class Client:
    """A streaming chat request that reads `cut` tokens, then stops reading but keeps its connection (the
    server goes on generating), until `release` is set."""

    def __init__(self, url: str, prompt: str, max_tokens: int, cut: int, release: threading.Event):
        self.body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                     "stream": True, "ignore_eos": True, "temperature": 0.0}
        self.url, self.cut, self.release = url, cut, release
        self.request_id, self.before, self.after, self.owner = "", [], [], ""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=self.body, timeout=120) as r:
            lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
            for line in lines:
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    self.request_id = chunk["id"]
                    self.before.append(chunk["choices"][0]["delta"].get("content", ""))
                    if len(self.before) >= self.cut:
                        break
            self.release.wait(300)

    def resume(self, url: str) -> None:
        last = len(self.before) - 1
        with httpx.stream("GET", f"{url}/v1/requests/{self.request_id}/stream", headers={"Last-Event-ID": str(last)},
                          timeout=120) as r:
            assert r.status_code == 200, r.read()
            self.owner = r.headers.get("x-slam-owner", url)
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.after.append(json.loads(line[6:]))


def wait_for(what: str, check, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return result


def test_old_epoch_writer_changes_nothing(servers):
    a, url_a = servers.start("a", "--slot", "0")
    d, url_d = servers.start("d", "--slot", "1")
    servers.wait_ready("a", a, url_a)
    release = threading.Event()
    clients = [Client(url_a, p, MAX_TOKENS, CUT_AT, release) for p in PROMPTS]
    try:
        wait_for("clients cut", lambda: all(len(c.before) >= CUT_AT for c in clients))
        rids = {c.request_id for c in clients}
        wait_for("epoch 0 holds the requests", lambda: rids <= set(servers.manifests(0)))

        # A stalls (as a partitioned node's pod does, for the cluster); B restores its slot at epoch 1, then
        # dies: epoch 1 holds what B restored. Then A comes back to life.
        a.send_signal(signal.SIGSTOP)
        b, url_b = servers.start("b", "--slot", "0", "--slot-epoch", "1", "--restore-slot", "0")
        servers.wait_ready("b", b, url_b)
        b.send_signal(signal.SIGKILL)
        b.wait()
        a.send_signal(signal.SIGCONT)
        assert latest_epoch(servers.store, 0) == 1
        epoch1 = {r.request_id: r for r in load_slot(servers.store, 0)}
        assert set(epoch1) == rids and all(r.status == "exact" and r.reserve[0]["n"] > 0 for r in epoch1.values())
        assert all(r.manifest["epoch"] == 1 and r.owner_url == url_b for r in epoch1.values())

        # C restores at epoch 2 after A, cut off, wrote epoch 0 on: newer objects with more tokens, and a
        # request B never saw. (A stalls again while C loads, which leaves C the machine's cores.)
        c, url_c = servers.start("c", "--slot", "0", "--slot-epoch", "2", "--restore-slot", "0")
        late = Client(url_a, "Count from one to fifty.", 120, 1, release)
        wait_for("late request", lambda: late.request_id)
        newer = wait_for("A writes on", lambda: (m := servers.manifests(0)) and late.request_id in m and all(
            rid in m and m[rid]["counts"]["output_tokens"] > len(epoch1[rid].output_ids) for rid in rids) and m)
        a.send_signal(signal.SIGSTOP)
        written = time.time()
        assert newer[late.request_id]["owner_url"] == url_a
        servers.wait_ready("c", c, url_c)
        servers.wait_ready("d", d, url_d)
        claimed_c = time.time()
        a.send_signal(signal.SIGCONT)
        # C deletes the epochs below its own: B's (dead) is gone for good; A, alive, writes epoch 0 again.
        wait_for("epoch 1 deleted", lambda: not servers.store.list(fmt.epoch_dir(servers.prefix, 0, 1)), 30)
        timings = json.loads((servers.tmp / "c.log").read_text().split("slam-restore ")[1].splitlines()[0])
        assert timings["load_start_unix"] + timings["model_load_s"] > written, "C restored before A wrote on"
        for rid, r in epoch1.items():  # C restored B's lineage, not A's newer objects
            info = httpx.get(f"{url_c}/v1/requests/{rid}", timeout=10).json()["restore"]
            assert info == {**info, "epoch": 1, "output_tokens": len(r.output_ids), "version": r.version}
        for url in (url_c, url_d):  # nobody restores or routes to the request A started after the failover
            missing = httpx.get(f"{url}/v1/requests/{late.request_id}", timeout=30)
            assert missing.status_code == 404, missing.text
        for cl in clients:  # D finds C as the owner, although A's manifests name A and are newer
            via_d = httpx.get(f"{url_d}/v1/requests/{cl.request_id}", timeout=30)
            assert via_d.status_code == 200 and via_d.headers["x-slam-owner"] == url_c, via_d.text

        # Clients resume with Last-Event-ID at C, or at D, which proxies to C.
        urls = [url_c, url_c, url_d, url_d]
        threads = [threading.Thread(target=cl.resume, args=(u,)) for cl, u in zip(clients, urls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert a.poll() is None
        m0 = servers.manifests(0).get(late.request_id)
        assert m0 and m0["created_unix"] > claimed_c, "A stopped writing: the test proves nothing"
        for cl in clients:
            uninterrupted = wait_for("A finishes", lambda: (s := httpx.get(
                f"{url_a}/v1/requests/{cl.request_id}", timeout=10).json())["status"] == "finished" and s)
            assert len(uninterrupted["output_ids"]) == MAX_TOKENS
            assert cl.owner == url_c
            assert [ch["index"] for ch in cl.after] == list(range(CUT_AT, MAX_TOKENS))
            assert [ch["token_id"] for ch in cl.after] == uninterrupted["output_ids"][CUT_AT:]
            assert "".join(cl.before) + "".join(ch["text"] for ch in cl.after) == uninterrupted["text"]
    finally:
        release.set()

    # Two pods for one slot: an epoch not above the claimed one (2) is refused before the model loads.
    (equal, fresh) = servers.refused([["--slot", "0", "--slot-epoch", "2", "--restore-slot", "0"],
                                      ["--slot", "1"]])  # D holds slot 1 at epoch 0
    assert "--slot-epoch (SLAM_SLOT_EPOCH): slot 0 is already claimed at epoch 2" in equal, equal
    assert "slot 1 is already claimed at epoch 0" in fresh, fresh
