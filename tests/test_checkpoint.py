"""Checkpoint and restore against a real S3 endpoint (moto, or SLAM_TEST_S3_ENDPOINT) and the real model.

Test (c) runs at 1,000 and 3,000 context tokens (about 100 s of the file's ~2 min on 2 busy cores);
SLAM_TEST_CONTEXTS="400,1200" makes it quicker (the property holds for any lengths above the budget).
"""

from __future__ import annotations

import logging
import os
import time

import pytest
from prometheus_client import CollectorRegistry

from s3_fixtures import MotoS3, make_config, s3_endpoint  # noqa: F401  (fixture)
from slam.checkpoint import Checkpointer, ObjectStore, load_slot, resume_into
from slam.checkpoint import format as fmt
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams, Sequence

logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines

SLAM_SMALL = CacheConfig(policy="slam", budget=96, sink=4, recent=32)  # small prompts still use the reserve
FULL = CacheConfig(policy="full", budget=None)
CONTEXTS = [int(x) for x in os.environ.get("SLAM_TEST_CONTEXTS", "1000,3000").split(",")]


@pytest.fixture(scope="module")
def loaded(smol):  # conftest's session-wide slam.model.load_model()
    return smol


@pytest.fixture(scope="module")
def text_ids(loaded) -> list[int]:
    colors = ["red", "blue", "green"]
    text = " ".join(f"Item {i}: the {colors[i % 3]} box holds {i * 7 % 13} coins." for i in range(400))
    ids = loaded.tokenizer.encode(text)
    assert len(ids) >= max(CONTEXTS)
    return ids


@pytest.fixture
def cfg(s3_endpoint):  # noqa: F811
    endpoint, access, secret = s3_endpoint
    return make_config(endpoint, access, secret)


def engine(loaded, cache: CacheConfig = SLAM_SMALL, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(cache=cache, **kw), loaded=loaded)


def run_until(eng: LLMEngine, seqs: list[Sequence], outputs: int) -> None:
    while any(len(s.output_ids) < outputs and not s.finished for s in seqs):
        eng.step()


def finish(eng: LLMEngine, seqs: list[Sequence]) -> None:
    while any(not s.finished for s in seqs):
        eng.step()


def restore_and_finish(loaded, store: ObjectStore, slot: int, order: list[str], cache=SLAM_SMALL):
    """A fresh engine restores the slot (in `order`, so batches match the original) and runs to the end."""
    eng = engine(loaded, cache)
    restored = {r.request_id: r for r in load_slot(store, slot)}
    seqs = [resume_into(eng, restored[rid]) for rid in order]
    finish(eng, seqs)
    return restored, seqs


# --- (a) exact continuation ---------------------------------------------------------------------------
def test_restore_continues_identically(loaded, text_ids, cfg):
    store = ObjectStore(cfg)
    ckpt = Checkpointer(store, cfg)
    eng = engine(loaded)
    prompt = text_ids[:200]
    greedy = eng.add_request(prompt, SamplingParams(max_tokens=28, ignore_eos=True))
    sampled = SamplingParams(max_tokens=28, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    seeded = eng.add_request(prompt[:150], sampled)
    run_until(eng, [greedy, seeded], 8)
    for seq in (greedy, seeded):
        assert ckpt.checkpoint(seq)
    assert ckpt.flush(60)
    assert ckpt.failures_total == 0 and ckpt.uploads_total == 2
    finish(eng, [greedy, seeded])  # the uninterrupted reference

    eng2 = engine(loaded)
    restored = {r.request_id: r for r in load_slot(store, cfg.slot)}
    seqs = [resume_into(eng2, restored[s.request_id]) for s in (greedy, seeded)]
    # The new owner goes on from the stored versions: version 2, and only reserve tokens not yet stored.
    ckpt2 = Checkpointer(store, cfg, claim=False)  # the epoch is ckpt's: a second claim of it would be fenced
    r0 = restored[greedy.request_id]
    ckpt2.adopt(r0.request_id, r0.store_state())
    run_until(eng2, seqs, 12)
    ckpt2.checkpoint(seqs[0])
    assert ckpt2.flush(60) and ckpt2.failures_total == 0
    finish(eng2, seqs)
    (again,) = [r for r in load_slot(store, cfg.slot) if r.request_id == greedy.request_id]
    segs = again.manifest["objects"]["segments"]
    assert again.version == 2 and len(segs) == 2 and segs[1]["first"] == segs[0]["last"] + 1
    assert "prompt" not in ckpt2.last_upload[greedy.request_id]
    for ref, got in zip((greedy, seeded), seqs):
        r = restored[ref.request_id]
        assert r.status == "exact" and r.reason == "" and r.reserve is not None and r.reserve[0]["n"] > 0
        assert got.output_ids == ref.output_ids
        assert got.output_text == ref.output_text
    m = restored[greedy.request_id].manifest
    assert m["slot"] == cfg.slot and m["counts"]["output_tokens"] == 8
    ckpt.close()
    ckpt2.close()


# --- (b) corruption falls back ---------------------------------------------------------------------------
def test_corruption_falls_back(loaded, text_ids, cfg):
    store = ObjectStore(cfg)
    ckpt = Checkpointer(store, cfg)
    eng = engine(loaded, FULL)
    seq = eng.add_request(text_ids[:160], SamplingParams(max_tokens=24, ignore_eos=True))
    for n in (6, 10):  # two versions
        run_until(eng, [seq], n)
        ckpt.checkpoint(seq)
        assert ckpt.flush(60)
    finish(eng, [seq])
    root = fmt.request_dir(cfg.prefix, cfg.slot, seq.request_id)
    v1, v2 = root + "v00000001/state.safetensors", root + "v00000002/state.safetensors"
    good_v2 = store.get(v2)

    def flipped(data: bytes) -> bytes:
        mid = len(data) // 2
        return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]

    def check(status: str, version: int) -> None:
        restored, (got,) = restore_and_finish(loaded, store, cfg.slot, [seq.request_id], FULL)
        r = restored[seq.request_id]
        assert (r.status, r.version) == (status, version), r.reason
        assert got.output_ids == seq.output_ids and got.output_text == seq.output_text

    store.put(v2, flipped(good_v2))  # flipped bytes in the newest state: the previous version
    check("exact", 1)
    store.delete(v2)  # the newest manifest names a deleted object: the previous version
    check("exact", 1)
    store.put(v1, flipped(store.get(v1)))  # both broken: re-prefill from the newest tokens (greedy, full)
    check("reprefill", 2)
    store.delete(root + "prompt.safetensors")  # not even the tokens: reported lost, never guessed
    (r,) = load_slot(store, cfg.slot)
    assert r.status == "lost" and resume_into(engine(loaded, FULL), r) is None
    ckpt.close()


def test_torn_version_is_ignored(loaded, text_ids, cfg):
    """A version whose manifest never arrived (or is mangled) does not exist; retention keeps 2."""
    store = ObjectStore(cfg)
    ckpt = Checkpointer(store, cfg)
    eng = engine(loaded)
    seq = eng.add_request(text_ids[:120], SamplingParams(max_tokens=12, ignore_eos=True))
    for n in (2, 4, 6):
        run_until(eng, [seq], n)
        ckpt.checkpoint(seq)
        assert ckpt.flush(60)
    root = fmt.request_dir(cfg.prefix, cfg.slot, seq.request_id)
    names = store.list(root)
    assert not any("v00000001/" in n for n in names)  # retention=2
    store.put(root + "v00000003/manifest.json", store.get(root + "v00000003/manifest.json")[:-20])
    (r,) = load_slot(store, cfg.slot)
    assert (r.status, r.version, r.latest_version) == ("exact", 2, 3)
    ckpt.delete_request(seq.request_id)
    assert ckpt.flush(30) and store.list(root) == []
    ckpt.close()


def test_int8_reserve_is_smaller_and_close(loaded, text_ids, cfg):
    """reserve_int8 shrinks segments about 3.8x; restored values are within half a quantization step
    (so outputs after such a restore may differ from the uninterrupted run: off by default)."""
    eng = engine(loaded)
    seq = eng.add_request(text_ids[:200], SamplingParams(max_tokens=8, ignore_eos=True))
    run_until(eng, [seq], 2)
    sizes = {}
    for int8 in (False, True):
        c = cfg.model_copy(update={"reserve_int8": int8, "prefix": f"{cfg.prefix}-{int8}"})
        ck = Checkpointer(ObjectStore(c), c)
        ck.checkpoint(seq)
        assert ck.flush(60) and ck.failures_total == 0
        sizes[int8] = ck.last_upload[seq.request_id]["segment"]
        ck.close()
    assert sizes[False] / sizes[True] > 3.5
    (r,) = load_slot(ObjectStore(c), c.slot)
    n = seq.policy.counts(seq.num_cached)[3]
    k = seq.pool.rk[0][seq.slot, :, :n]  # [kv_heads, n, head_dim]
    step = k.abs().amax(dim=-1, keepdim=True) / 127
    assert r.status == "exact" and ((r.reserve[0]["k"] - k).abs() <= step / 2 + 1e-6).all()
    eng2 = engine(loaded)
    got = resume_into(eng2, r)
    finish(eng2, [got])
    assert len(got.output_ids) == 8


# --- (c) bounded checkpoints -----------------------------------------------------------------------------
def test_bounded_state_and_interval_bytes(loaded, text_ids, cfg):
    short, long = CONTEXTS
    slam = CacheConfig(policy="slam", budget=256)
    eng = engine(loaded, slam, max_budget=long + 8)  # room for the full-cache request beside the slam ones
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    a = eng.add_request(text_ids[:short], sp)
    b = eng.add_request(text_ids[:long], sp)
    full = eng.add_request(text_ids[:long], SamplingParams(max_tokens=3, ignore_eos=True), FULL)

    store = ObjectStore(cfg)
    ckpt = Checkpointer(store, cfg)
    lean_cfg = cfg.model_copy(update={"include_reserve": False, "prefix": cfg.prefix + "-lean"})
    lean = Checkpointer(ObjectStore(lean_cfg), lean_cfg)
    full_sizes: list[tuple[int, int]] = []  # (context tokens, state bytes): mid-prefill, then after it
    while not full.output_ids:
        eng.step()
        if (full.num_cached >= short and not full_sizes) or full.output_ids:
            ckpt.checkpoint(full)
            assert ckpt.flush(120)
            full_sizes.append((full.num_cached, ckpt.last_upload[full.request_id]["state"]))
    run_until(eng, [a, b], 1)
    for c in (ckpt, lean):
        for s in (a, b):
            c.checkpoint(s)
    for _ in range(cfg.interval_tokens):  # exactly one interval: one token leaves each window per step
        eng.step()
    outputs = {s.request_id: len(s.output_ids) for s in (a, b)}  # a may be ahead: its prefill ended first
    for c in (ckpt, lean):
        for s in (a, b):
            c.checkpoint(s)
        assert c.flush(120) and c.failures_total == 0
    sa, sb = ckpt.last_upload[a.request_id], ckpt.last_upload[b.request_id]
    la, lb = lean.last_upload[a.request_id], lean.last_upload[b.request_id]
    # Without the reserve: the state is bounded by the budget, not the context; full grows with it.
    assert la["state"] == lb["state"] and "segment" not in la
    (n1, f1), (n2, f2) = full_sizes
    assert n2 > n1 and f2 > f1 * (n2 / n1) * 0.9
    # With the reserve: one interval uploads one segment of interval_tokens tokens plus the state.
    per_interval = {k: sa[k] for k in ("segment", "state")}
    assert per_interval == {k: sb[k] for k in ("segment", "state")}
    for s in (a, b):
        root = fmt.request_dir(cfg.prefix, cfg.slot, s.request_id)
        manifest = fmt.decode_manifest(store.get(root + fmt.version_dir(2) + fmt.MANIFEST))
        seg = manifest["objects"]["segments"][-1]
        assert seg["last"] - seg["first"] + 1 == cfg.interval_tokens
    # Only the generated-token list grows (8 bytes a token; the prompt is stored once per request).
    assert sa["tokens"] - sb["tokens"] == 8 * (outputs[a.request_id] - outputs[b.request_id])
    print(f"\ncontexts {short}/{long}: slam state {la['state']} B; per interval {per_interval}; full {full_sizes}")

    # A lean restore keeps going with an empty reserve (later recalls only see tokens evicted afterwards).
    eng2 = engine(loaded, slam, max_budget=long + 8)
    (r,) = [x for x in load_slot(lean.store, lean_cfg.slot) if x.request_id == a.request_id]
    assert r.status == "exact" and r.reserve is None and r.reserve_next_pos is not None
    seq = resume_into(eng2, r)
    assert not (seq.pool.rpos[seq.slot] >= 0).any()
    run_until(eng2, [seq], len(r.output_ids) + 4)
    ckpt.close()
    lean.close()


# --- (d) store outage ------------------------------------------------------------------------------------
def test_store_outage_does_not_block(loaded, text_ids):
    server = MotoS3()
    server.start()
    cfg = make_config(server.endpoint, "testing", "testing", backoff_s=0.02, backoff_max_s=0.2, timeout_s=1.0)
    store = ObjectStore(cfg)
    registry = CollectorRegistry()
    ckpt = Checkpointer(store, cfg, registry)
    eng = engine(loaded)
    seq = eng.add_request(text_ids[:100], SamplingParams(max_tokens=20, ignore_eos=True))
    run_until(eng, [seq], 2)
    ckpt.after_step([seq])  # the first token makes a request due
    ckpt.after_step([seq])  # not again before interval_tokens more
    assert ckpt.flush(30) and ckpt.uploads_total == 1
    server.stop()
    try:
        for n in (4, 6, 8):
            run_until(eng, [seq], n)
            t0 = time.monotonic()
            snap = ckpt.snapshot(seq)
            assert ckpt.submit(snap)
            assert time.monotonic() - t0 < 0.5  # a copy and a queue insert, whatever the store does
        deadline = time.monotonic() + 20
        while ckpt.failures_total < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt.failures_total >= 3 and ckpt.uploads_total == 1
        assert ckpt.pending() <= 1  # coalesced: one request, at most one queued snapshot
    finally:
        server.start()
    assert ckpt.flush(30)
    assert ckpt.uploads_total >= 2  # the latest snapshot (plus possibly an older one in flight at restart)
    (r,) = load_slot(store, cfg.slot)
    assert r.status == "exact" and len(r.output_ids) == 8
    metric = registry.get_sample_value
    assert metric("slam:checkpoint_failures_total") == ckpt.failures_total
    assert metric("slam:checkpoint_bytes_total") == ckpt.bytes_total > 0
    assert metric("slam:checkpoint_seconds_count") == ckpt.uploads_total
    finish(eng, [seq])
    ckpt.after_step([seq])  # finished: its objects go
    # Only the epoch's claim stays: it keeps older epochs of the slot stale even with no request in flight.
    claim = fmt.epoch_dir(cfg.prefix, cfg.slot, cfg.epoch) + fmt.EPOCH_MARKER
    assert ckpt.flush(30) and store.list(cfg.prefix) == [claim]
    ckpt.close()
    server.stop()
