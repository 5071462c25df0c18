"""Issue 9 item 5: resumes are proxied only to trusted peers, with the replica's own token; the slot's owner
collects stale checkpoints. Real servers, moto's real S3 server, real checkpoints of the real model."""

from __future__ import annotations

import contextlib
import json
import os
import time

import httpx
import pytest
from api_fixtures import MODEL, SERVER_DTYPE, running_server
from s3_fixtures import make_config, s3_endpoint  # noqa: F401  (fixture)
from slam.api.janitor import collect
from slam.api.proxy import find_owner, trusted
from slam.api.streams import RETENTION_S
from slam.checkpoint import Checkpointer, ObjectStore, latest_epoch, load_slot
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams

pytestmark = pytest.mark.timeout(300)
TOKEN = "replica-secret"


def test_trusted_peers():
    peers = ["web-pods.default.svc.cluster.local", "127.0.0.1"]
    assert trusted("http://web-0.web-pods.default.svc.cluster.local:8000", peers)
    assert trusted("https://127.0.0.1:9", peers)
    for url in ("http://evil.example:80", "http://web-pods.default.svc.cluster.local.evil.example",
                "http://xweb-pods.default.svc.cluster.local", "file:///etc/passwd", "http://user:pw@127.0.0.1:1",
                "http://127.0.0.1:notaport", "gopher://127.0.0.1", "", "http://[::1"):
        assert not trusted(url, peers), url


@pytest.fixture(scope="module")
def engine(smol) -> LLMEngine:
    return LLMEngine(EngineConfig(max_batch=4, cache=CacheConfig(policy="slam", budget=24, sink=4, recent=8),
                                  dtype=SERVER_DTYPE), smol)


def checkpointed(engine: LLMEngine, config, versions: int = 1):
    """A real request of the engine with `versions` checkpoints stored, then dropped from the engine. The
    slot's epoch is claimed once, by the first of them (a second claim of it would be fenced)."""
    store = ObjectStore(config)
    ckpt = Checkpointer(store, config, claim=latest_epoch(store, config.slot) is None)
    seq = engine.add_request(engine.encode("Tell me a story about"), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(versions):
        engine.step()
        assert ckpt.checkpoint(seq)
        assert ckpt.flush(30)
    engine.abort(seq)
    engine.step()
    ckpt.close(5)
    return seq.request_id


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_proxy_only_to_trusted_owners_with_the_replica_token(s3_endpoint, engine, tmp_path):
    endpoint, access, secret = s3_endpoint
    prefix = f"proxy-{time.monotonic_ns()}"
    (tmp_path / "owner.keys").write_text("owner-key\n")
    (tmp_path / "client.keys").write_text("client-key\n")
    common = ["--s3-endpoint", endpoint, "--s3-bucket", "slam-test", "--s3-prefix", prefix, "--budget", "24",
              "--sink", "4", "--recent", "8", "--checkpoint-interval", "1"]
    # A manifest that names a host outside the trusted set: written by a real checkpointer.
    foreign = checkpointed(engine, make_config(endpoint, access, secret, bucket="slam-test", prefix=prefix, slot=7,
                                               advertise_url="http://evil.example:9"))
    with env(SLAM_S3_ACCESS_KEY=access, SLAM_S3_SECRET_KEY=secret, SLAM_REPLICA_TOKEN=TOKEN), \
            running_server(*common, "--slot", "1", "--api-key-file", str(tmp_path / "owner.keys"),
                           log=tmp_path / "owner.log") as owner, \
            running_server(*common, "--slot", "0", "--api-key-file", str(tmp_path / "client.keys"),
                           log=tmp_path / "front.log") as front:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{owner}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer owner-key"}) as r:
            rid = r.headers["X-Request-Id"]
            next(line for line in r.iter_lines() if line.startswith("data: "))
            deadline = time.monotonic() + 20
            while True:  # the first checkpoint names the owner
                got = httpx.get(f"{front}/v1/requests/{rid}", headers={"Authorization": "Bearer client-key"})
                if got.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            # The front replica forwarded with its replica token: the owner does not know the client's key.
            assert got.status_code == 200, got.text
            assert got.json()["status"] == "running" and got.headers["X-Slam-Owner"] == owner
            # The replica token opens only the resume routes of the owner, not generation.
            r2 = httpx.post(f"{owner}/v1/completions", json={**body, "stream": False, "max_tokens": 1},
                            headers={"Authorization": f"Bearer {TOKEN}"})
            assert r2.status_code == 401
        gone = httpx.get(f"{front}/v1/requests/{foreign}", headers={"Authorization": "Bearer client-key"})
        assert gone.status_code == 404, gone.text
        assert "not a trusted peer" in (tmp_path / "front.log").read_text()


def test_the_slot_owner_collects_stale_checkpoints(s3_endpoint, engine):
    endpoint, access, secret = s3_endpoint
    config = make_config(endpoint, access, secret, slot=2)
    store = ObjectStore(config)
    left = checkpointed(engine, config)  # nobody resumed it: not live on this replica
    live = checkpointed(engine, config, versions=2)
    names = store.list(f"{config.prefix}/")
    version = next(n for n in names if f"/{live}/" in n and "/v00000002/" in n and "tokens" in n)
    orphan = version.replace("/v00000002/", "/v00000000/")  # an upload cut off before its manifest
    store.put(orphan, b"partial")
    other_slot = make_config(endpoint, access, secret, slot=3, prefix=config.prefix)
    elsewhere = checkpointed(engine, other_slot)

    counts = collect(store, 2, live={live}, max_age_s=3600, orphan_grace_s=0)
    names = store.list(f"{config.prefix}/")
    assert not any(f"/{left}/" in n for n in names)
    assert orphan not in names and any(f"/{live}/" in n and "manifest.json" in n for n in names)
    assert any(f"/{elsewhere}/" in n for n in names)  # another slot: not ours to collect
    assert counts["requests"] == 1 and counts["versions"] == 1
    # Within the grace, a request not (yet) live here is kept; past the maximum age even a live one goes.
    assert collect(store, 2, live=set(), max_age_s=3600, orphan_grace_s=600)["requests"] == 0
    assert collect(store, 2, live={live}, max_age_s=3600, orphan_grace_s=0, now=time.time() + 3700)["requests"] == 1
    assert not any(f"/{live}/" in n for n in store.list(f"{config.prefix}/"))
    assert json.loads(json.dumps(counts))  # plain counts, for the log line


def test_a_finished_request_still_names_its_owner(s3_endpoint, engine):
    """Once a request finishes, its checkpoints give way to a record of its owner: a client reconnecting to
    another replica is still forwarded to the finished stream, a restore does not bring the request back,
    and the slot's collector removes the record when the owner no longer keeps the stream."""
    endpoint, access, secret = s3_endpoint
    config = make_config(endpoint, access, secret, slot=4, advertise_url="http://owner.example:8000",
                         interval_tokens=2)
    store = ObjectStore(config)
    ckpt = Checkpointer(store, config)
    seq = engine.add_request(engine.encode("Tell me a story about"), SamplingParams(max_tokens=6, ignore_eos=True))
    root = ckpt.root(seq.request_id)
    while engine.has_work():
        ckpt.after_step([out.seq for out in engine.step()])
        if not seq.finished:
            assert ckpt.flush(30)
            assert find_owner(store, seq.request_id) == config.advertise_url  # from its manifests
    assert ckpt.flush(30)
    ckpt.close(5)
    assert store.list(root) == [root + "finished.json"]  # the checkpoints are gone, the record stays
    assert find_owner(store, seq.request_id) == config.advertise_url
    assert load_slot(store, 4) == []

    assert collect(store, 4, live=set(), max_age_s=3600, orphan_grace_s=0)["finished"] == 0
    later = time.time() + RETENTION_S + 1
    assert collect(store, 4, live=set(), max_age_s=3600, orphan_grace_s=0, now=later)["finished"] == 1
    assert store.list(root) == [] and find_owner(store, seq.request_id) is None
