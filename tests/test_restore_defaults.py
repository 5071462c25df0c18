"""Restore at the server's default settings (slam, budget 256): a short request killed early has an empty
reserve, which once made `slam serve --restore-slot` die at start and crash-loop.

A 10-token prompt, SIGKILL after 20 generated tokens, restore on a new process: greedy and seeded requests
resume token-identical to an uninterrupted run, while a third request of the same slot, whose checkpoint
was deliberately corrupted (a manifest naming an unknown policy, checksum intact), is reported and skipped.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import uuid

import httpx
import pytest

from api_fixtures import MODEL, SERVER_DTYPE
from s3_fixtures import MotoS3
from test_failover import server
from slam.checkpoint import CheckpointConfig, ObjectStore
from slam.checkpoint import format as fmt
from slam.config import EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams

MAX_TOKENS, CUT_AT = 56, 20  # 10 + 56 tokens stay within sink + recent (68): the reserve stays empty
REQUESTS = [{"temperature": 0.0}, {"temperature": 0.8, "seed": 7}, {"temperature": 0.0}]  # the last is corrupted


def default_server(s3: MotoS3, prefix: str, log, *args: str):
    """A checkpointing `slam serve` at every default but the S3 settings."""
    return server(s3, prefix, log, *args, base_args=[])


@pytest.fixture(scope="module")
def s3():
    server = MotoS3()
    server.start()
    yield server
    server.stop()


def stream(url: str, prompt: list[int], sampling: dict, got: list) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True,
            **sampling}
    with contextlib.suppress(httpx.HTTPError):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    got.append(json.loads(line[6:])["id"])


def store_of(s3: MotoS3, prefix: str) -> ObjectStore:
    return ObjectStore(CheckpointConfig(endpoint=s3.endpoint, bucket="slam", prefix=prefix, access_key="testing",
                                        secret_key="testing"))


def manifests(store: ObjectStore, prefix: str, request_id: str) -> list[str]:
    return sorted(n for n in store.list(prefix + "/") if f"/{request_id}/" in n and n.endswith(fmt.MANIFEST))


def corrupt_policy(store: ObjectStore, prefix: str, request_id: str) -> None:
    """Rewrite the request's newest manifest with an unknown policy (and a valid checksum)."""
    names = manifests(store, prefix, request_id)
    assert names, f"no manifest of {request_id}"
    body = fmt.decode_manifest(store.get(names[-1]))
    body["cache_config"]["policy"] = "no-such-policy"
    store.put(names[-1], fmt.encode_manifest(body))


@pytest.mark.slow
def test_restore_at_server_defaults_after_a_short_request(s3, smol, tmp_path):
    prompt = list(range(1000, 1010))  # 10 tokens: the context never passes sink + recent before the kill
    prefix = f"d-{uuid.uuid4().hex[:6]}"
    got = [[] for _ in REQUESTS]
    with default_server(s3, prefix, tmp_path / "a.log", "--checkpoint-interval", "4") as (proc, url):
        threads = [threading.Thread(target=stream, args=(url, prompt, s, g), daemon=True) for s, g in zip(REQUESTS, got)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while min(len(g) for g in got) < CUT_AT:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The kill comes once every request has a checkpoint: the first of each is a whole snapshot, and one
        # worker uploads them in turn, which on a loaded machine takes longer than the tokens' pace.
        store = store_of(s3, prefix)
        while not all(manifests(store, prefix, g[0]) for g in got):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert max(len(g) for g in got) < MAX_TOKENS, "a request finished before the kill: nothing to restore"
    request_ids = [g[0] for g in got]
    corrupt_policy(store, prefix, request_ids[2])
    with default_server(s3, prefix, tmp_path / "b.log", "--restore-slot", "0", "--slot-epoch", "1") as (_, url):
        log = (tmp_path / "b.log").read_text()
        assert request_ids[2] in log  # reported, not fatal
        engine = LLMEngine(EngineConfig(dtype=SERVER_DTYPE), loaded=smol)  # the server's defaults, uninterrupted
        for rid, sampling in zip(request_ids[:2], REQUESTS[:2]):
            [ref] = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **sampling))
            deadline = time.monotonic() + 120
            while (state := httpx.get(f"{url}/v1/requests/{rid}", timeout=10).json())["status"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert state["status"] == "finished", state
            assert state["output_ids"] == ref.output_ids, sampling
        # The corrupt request is not served as if restored: an error in the OpenAI shape (its manifest names
        # the dead replica as owner, so the lookup fails) or a failed status.
        gone = httpx.get(f"{url}/v1/requests/{request_ids[2]}", timeout=10)
        assert gone.status_code >= 400 and "error" in gone.json() or gone.json().get("status") == "failed", gone.text
