"""Failover end to end: real `slam serve` processes, a moto S3 endpoint, clients that resume with Last-Event-ID.

(a) SIGKILL mid-generation, restore on another server: every client's tokens equal an uninterrupted run.
(b) SIGTERM: the shutdown checkpoint holds every token generated; (d) half the clients resume through a
    replica that does not own their request (proxied from the owner named in the manifest).
(c) the S3 endpoint is down for a while: requests finish correctly, failures are counted, checkpoints resume.
Each test runs 4 requests of MAX_TOKENS tokens (3 greedy, 1 sampled with a seed) with small caches.
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from api_fixtures import MODEL, SERVER_DTYPE, free_port, metric, serve_command, server_env
from s3_fixtures import MotoS3
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams

logging.getLogger("werkzeug").setLevel(logging.ERROR)

MAX_TOKENS, CUT_AT = 120, 40
BUDGET, SINK, RECENT, BATCH = 96, 4, 16, 4
PROMPTS = ["Tell me about the sea.", "List some colors.", "Why is the sky blue?", "Write a short poem."]
SAMPLED = {"temperature": 0.8, "seed": 7}  # the last prompt samples
BASE_ARGS = ["--budget", str(BUDGET), "--sink", str(SINK), "--recent", str(RECENT), "--max-batch", str(BATCH),
             "--checkpoint-interval", "8"]


@pytest.fixture(scope="module")
def s3() -> MotoS3:
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(smol) -> list[tuple[list[int], str]]:
    """(token ids, text) of each request in one uninterrupted batch with the servers' settings."""
    cache = CacheConfig(policy="slam", budget=BUDGET, sink=SINK, recent=RECENT)
    engine = LLMEngine(EngineConfig(max_batch=BATCH, cache=cache, dtype=SERVER_DTYPE), loaded=smol)
    seqs = [engine.add_request(engine.encode_chat([{"role": "user", "content": p}]), _sampling(i))
            for i, p in enumerate(PROMPTS)]
    while engine.has_work():
        engine.step()
    return [(list(s.output_ids), s.output_text) for s in seqs]


def _sampling(i: int) -> SamplingParams:
    extra = SAMPLED if i == len(PROMPTS) - 1 else {"temperature": 0.0}
    return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **extra)


@contextlib.contextmanager
def server(s3: MotoS3, prefix: str, log: Path, *args: str, base_args: list[str] = BASE_ARGS):
    """A `slam serve` process checkpointing to `s3` (with this file's small caches unless `base_args` says
    otherwise); yields (process, url) once /ready is 200."""
    port = free_port()
    env = {**server_env(), "SLAM_S3_ACCESS_KEY": "testing", "SLAM_S3_SECRET_KEY": "testing"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(serve_command("--port", str(port), "--s3-endpoint", s3.endpoint, "--s3-prefix",
                                              prefix, *base_args, *args), env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@dataclass
class Client:
    """One streaming chat request: the events it received before the cut and after resuming."""

    prompt: str
    sampling: dict
    request_id: str = ""
    before: list[tuple[int, str]] = field(default_factory=list)  # (SSE id, text) from the original stream
    after: list[dict] = field(default_factory=list)  # resumed chunks
    done: bool = False

    def run(self, url: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": self.prompt}], "max_tokens": MAX_TOKENS,
                "stream": True, "ignore_eos": True, **self.sampling}
        sse_id = None
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("id: "):
                        sse_id = int(line[4:])
                    elif line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        self.request_id = chunk["id"]
                        self.before.append((sse_id, chunk["choices"][0]["delta"].get("content", "")))
        except httpx.HTTPError:
            pass  # the server died: what we have is what we resume from

    @property
    def last_id(self) -> int:
        return self.before[-1][0] if self.before else -1

    def resume(self, url: str) -> None:
        headers = {"Last-Event-ID": str(self.last_id)}
        with httpx.stream("GET", f"{url}/v1/requests/{self.request_id}/stream", headers=headers, timeout=120) as r:
            assert r.status_code == 200, r.read()
            sse_id = None
            for line in r.iter_lines():
                if line.startswith("id: "):
                    sse_id = int(line[4:])
                elif line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    assert chunk["index"] == sse_id
                    self.after.append(chunk)


def start_clients(url: str) -> tuple[list[Client], list[threading.Thread]]:
    clients = [Client(p, SAMPLED if i == len(PROMPTS) - 1 else {"temperature": 0.0}) for i, p in enumerate(PROMPTS)]
    threads = [threading.Thread(target=c.run, args=(url,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(len(c.before) for c in clients) < CUT_AT:
        assert time.monotonic() < deadline, [len(c.before) for c in clients]
        time.sleep(0.05)
    return clients, threads


def check(clients: list[Client], reference, owner_url: str) -> None:
    for c, (ref_ids, ref_text) in zip(clients, reference):
        ids = [i for i, _ in c.before] + [ch["index"] for ch in c.after]
        assert ids == list(range(MAX_TOKENS)), f"{c.request_id}: token indices lost or repeated"
        assert c.done and c.after[-1]["finish_reason"] == "length"
        assert [ch["token_id"] for ch in c.after] == ref_ids[c.last_id + 1 :], c.request_id
        assert "".join(t for _, t in c.before) + "".join(ch["text"] for ch in c.after) == ref_text
        state = httpx.get(f"{owner_url}/v1/requests/{c.request_id}", timeout=10).json()
        assert state["status"] == "finished" and state["output_ids"] == ref_ids and state["text"] == ref_text


def _resume_all(clients: list[Client], urls: list[str]) -> None:
    threads = [threading.Thread(target=c.resume, args=(u,), daemon=True) for c, u in zip(clients, urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)


# "on": server A launches each decode step before postprocessing the last (on the CPU too), so its checkpoints
# must wait for requests at rest; the restoring server runs at its default.
@pytest.mark.parametrize("scheduling", ["auto", "on"])
def test_sigkill_then_restore(s3, reference, tmp_path, scheduling):
    prefix = f"t-{uuid.uuid4().hex[:6]}"
    with server(s3, prefix, tmp_path / "a.log", "--slot", "0", "--async-scheduling", scheduling) as (proc_a, url_a):
        clients, threads = start_clients(url_a)
        ahead = metric(url_a, "slam:engine_steps_ahead_total")
        proc_a.send_signal(signal.SIGKILL)
        proc_a.wait()
    for t in threads:
        t.join(timeout=30)
    assert all(c.last_id >= CUT_AT - 1 and c.last_id < MAX_TOKENS - 1 for c in clients)
    assert (ahead > 0) == (scheduling == "on")  # "auto" keeps a CPU's steps in order
    with server(s3, prefix, tmp_path / "b.log", "--slot", "0", "--slot-epoch", "1", "--restore-slot", "0") as (_, url_b):
        _resume_all(clients, [url_b] * len(clients))
        check(clients, reference, url_b)
        assert "slam-restore" in (tmp_path / "b.log").read_text()


@pytest.mark.parametrize("scheduling", ["auto", "on"])
def test_sigterm_checkpoints_then_resume_through_proxy(s3, reference, tmp_path, scheduling):
    prefix = f"t-{uuid.uuid4().hex[:6]}"
    with server(s3, prefix, tmp_path / "a.log", "--slot", "0", "--async-scheduling", scheduling) as (proc_a, url_a):
        clients, threads = start_clients(url_a)
        proc_a.send_signal(signal.SIGTERM)
        # Admission stops at once: a new request is refused (503) or finds the socket closed already.
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.post(f"{url_a}/v1/chat/completions", timeout=5,
                           json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 503
        assert proc_a.wait(timeout=60) is not None
    for t in threads:
        t.join(timeout=30)
    log_a = (tmp_path / "a.log").read_text()
    assert "shutdown checkpoint of 4 requests done" in log_a, log_a[-2000:]
    with server(s3, prefix, tmp_path / "b.log", "--slot", "0", "--slot-epoch", "1", "--restore-slot", "0") as (_, url_b):
        restored = {c.request_id: httpx.get(f"{url_b}/v1/requests/{c.request_id}", timeout=10).json()
                    for c in clients}
        for c in clients:  # the graceful checkpoint holds every token A generated (at least all it delivered)
            assert restored[c.request_id]["restore"]["output_tokens"] >= c.last_id + 1
        with server(s3, prefix, tmp_path / "c.log", "--slot", "1") as (_, url_c):
            # The first two resume on their owner, the last two through C, which proxies to B.
            _resume_all(clients, [url_b, url_b, url_c, url_c])
            check(clients, reference, url_b)
            # Finished on B, a request is still forwarded there: a client may reconnect after the end.
            headers = {"Last-Event-ID": str(MAX_TOKENS - 3)}
            with httpx.stream("GET", f"{url_c}/v1/requests/{clients[0].request_id}/stream", headers=headers,
                              timeout=60) as r:
                assert r.status_code == 200 and r.headers["X-Slam-Owner"] == url_b
                late = [int(line[4:]) for line in r.iter_lines() if line.startswith("id: ")]
            assert late == [MAX_TOKENS - 2, MAX_TOKENS - 1]
            missing = httpx.get(f"{url_c}/v1/requests/chatcmpl-nosuch/stream", timeout=10)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"


def test_s3_outage_does_not_stop_serving(s3, reference, tmp_path):
    prefix = f"t-{uuid.uuid4().hex[:6]}"
    with server(s3, prefix, tmp_path / "a.log", "--slot", "0") as (_, url):
        clients = [Client(p, SAMPLED if i == len(PROMPTS) - 1 else {"temperature": 0.0})
                   for i, p in enumerate(PROMPTS)]
        threads = [threading.Thread(target=c.run, args=(url,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        while min(len(c.before) for c in clients) < 8:
            time.sleep(0.05)
        uploads = metric(url, "slam:checkpoint_seconds_count")
        s3.stop()
        try:
            # S3 stays down until uploads have failed for a while, and comes back while the requests still
            # run (however fast this machine decodes), so that uploads must resume.
            deadline = time.monotonic() + 10
            while metric(url, "slam:checkpoint_failures_total") == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)
        finally:
            s3.start()
        failures = metric(url, "slam:checkpoint_failures_total")
        assert failures > 0
        during = metric(url, "slam:checkpoint_seconds_count")
        for t in threads:
            t.join(timeout=120)
        after = metric(url, "slam:checkpoint_seconds_count")
        assert after > during >= uploads, (uploads, during, after)  # uploads went on once S3 was back
        for c, (ref_ids, ref_text) in zip(clients, reference):
            assert [i for i, _ in c.before] == list(range(MAX_TOKENS))
            assert "".join(t for _, t in c.before) == ref_text
