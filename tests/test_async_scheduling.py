"""Async scheduling on the real embedded model: a decode step launched before the previous one is
postprocessed gives every request the tokens of the in-order engine, whatever ends, joins or leaves while a
step is in flight, and checkpoints still see requests at rest.

On the CPU the launch runs at once, so these tests check the bookkeeping (input tokens read on the device,
dropped tokens of finished requests, seeds, sitting out), which is the same code that overlaps on GPUs.
"""

from __future__ import annotations

import pytest

from s3_fixtures import make_config, s3_endpoint  # noqa: F401  (fixture)
from slam.checkpoint import Checkpointer, ObjectStore, load_slot, resume_into
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams

TEXTS = ["Tell me about cats.", "Why is the sky blue? Explain in detail, please, for a child of ten.", "Hi",
         "Name a famous physicist and describe one discovery they made, with dates."]
SLAM = CacheConfig(policy="slam", budget=72, sink=4, recent=16)  # the reserve fills within these requests


def engine(loaded, mode: str, cache: CacheConfig = SLAM, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(max_batch=4, prefill_chunk=32, cache=cache, async_scheduling=mode, **kw), loaded)


def sampling(i: int, **kw) -> SamplingParams:
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 100 + i} if i % 2 else {}
    return SamplingParams(**{"max_tokens": 14 + 5 * i, "ignore_eos": True} | seeded | kw)


def run(eng: LLMEngine, prompts, params, join_at: int | None = None, abort_at: int | None = None):
    """Run to the end; the last prompt joins after `join_at` steps, the first is aborted after `abort_at`.
    Returns the sequences and every (request, token index, token, cache tokens) the steps emitted."""
    first = prompts if join_at is None else prompts[:-1]
    seqs = [eng.add_request(p, s) for p, s in zip(first, params)]
    emitted, steps = [], 0
    while eng.has_work():
        for out in eng.step():
            emitted.append((out.seq.request_id, len(out.seq.output_ids) - 1, out.token_id, out.cache_tokens))
        steps += 1
        if steps == join_at:
            seqs.append(eng.add_request(prompts[-1], params[len(seqs)]))
        if steps == abort_at:
            eng.abort(seqs[0])
    return seqs, emitted


def in_order(*_):
    raise AssertionError("a step ran in order")


@pytest.fixture(scope="module")
def prompts(smol):
    return [smol.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False) for t in TEXTS]


@pytest.mark.parametrize("cache", [SLAM, CacheConfig(policy="full", budget=None)], ids=["slam", "full"])
def test_same_tokens_as_in_order(smol, prompts, cache):
    params = [sampling(i) for i in range(len(prompts))]
    kw = {"max_budget": 1024} if cache.policy == "full" else {}
    ref, ref_emitted = run(engine(smol, "off", cache, **kw), prompts, params)
    eng = engine(smol, "on", cache, **kw)
    assert eng.async_scheduling
    eng.postprocess = in_order  # prefill chunks and decode steps alike run ahead
    seqs, emitted = run(eng, prompts, params)
    assert [s.output_ids for s in seqs] == [s.output_ids for s in ref]
    assert [s.output_text for s in seqs] == [s.output_text for s in ref]
    # Every token emitted once, in order, and nothing left in flight.
    for s in seqs:
        assert [(i, t) for rid, i, t, _ in emitted if rid == s.request_id] == list(enumerate(s.output_ids))
        assert s.in_flight == 0
    assert eng.in_flight is None and not eng.runner.pool.replaced.any()
    # Each token reports the cache after its own step, not after the step in flight behind it.
    caches = [[c for rid, _, _, c in emitted if rid == s.request_id] for s in seqs]
    assert caches == [[c for rid, _, _, c in ref_emitted if rid == s.request_id] for s in ref]


def test_steps_run_ahead_and_return_the_previous_outputs(smol, prompts):
    eng = engine(smol, "on")
    seq = eng.add_request(prompts[0], SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(seq.prompt_ids) > 32  # two prefill chunks of at most 32 tokens
    assert eng.step() == [] and eng.in_flight is None and seq.num_cached == 32  # no row samples yet
    assert eng.step() == [] and seq.in_flight == 1 and not seq.output_ids  # the prompt's end samples, ahead
    for n in range(1, 6):  # each call launches token n + 1's step, then hands out token n
        out = eng.step()
        assert [o.token_id for o in out] == seq.output_ids[-1:] and len(seq.output_ids) == n
        assert seq.in_flight == 1
    last = eng.step()  # token 6 ends the request by length: nothing more launches, its token comes out
    assert [o.token_id for o in last] == seq.output_ids[-1:] and last[0].finished and not eng.has_work()
    ref = engine(smol, "off").generate([prompts[0]], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert seq.output_ids == ref.output_ids and seq.finish_reason == "length"
    assert eng.stats.steps_ahead == 6


def test_early_stop_join_and_abort_while_in_flight(smol, prompts):
    """A stop token ends a request while its next step is in flight (that token is dropped); a request joins
    mid-run (its prefill runs ahead like a decode step); another is aborted with a step in flight."""
    probe = engine(smol, "off").generate([prompts[1]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop = probe.output_ids[6]  # greedy request 1 stops at its 7th token, or earlier where that token appears
    params = [sampling(i) for i in range(len(prompts))]
    params[1] = SamplingParams(max_tokens=30, stop_token_ids=[stop])
    ref = {}
    for mode in ("off", "on"):
        eng = engine(smol, mode)
        if mode == "on":
            eng.postprocess = in_order  # the joiner's prefill runs ahead too
        ref[mode] = run(eng, prompts, params, join_at=5, abort_at=9)
    (off, _), (on, emitted) = ref["off"], ref["on"]
    assert on[1].finish_reason == "stop" and on[1].output_ids == off[1].output_ids
    assert on[1].output_ids[-1] == stop and len(on[1].output_ids) <= 7
    assert [s.output_ids for s in on[2:]] == [s.output_ids for s in off[2:]]  # the joiner too
    # The aborted request emitted a prefix of its in-order tokens and nothing after its abort.
    assert on[0].finish_reason == "abort" and on[0].output_ids == off[0].output_ids[: len(on[0].output_ids)]
    assert [t for rid, _, t, _ in emitted if rid == on[0].request_id] == on[0].output_ids


def test_requests_that_need_their_tokens_keep_steps_in_order(smol, prompts):
    """Penalties and logprobs need the host's tokens before sampling: their steps never run ahead, and their
    tokens equal the in-order engine's."""
    params = [sampling(0, repetition_penalty=1.3), sampling(1, logprobs=2)]
    out = {}
    for mode in ("off", "on"):
        eng = engine(smol, mode)
        seqs = [eng.add_request(p, s) for p, s in zip(prompts[:2], params)]
        logprobs = []
        while eng.has_work():
            logprobs += [o.logprob for o in eng.step() if o.seq is seqs[1]]
            assert eng.in_flight is None
        out[mode] = [s.output_ids for s in seqs], logprobs
    assert out["on"] == out["off"]


def test_barrier_makes_due_requests_sit_out(smol, prompts):
    """A request the barrier names is at rest when its token comes out: it skipped the step launched while
    that token was in flight, and its tokens are still those of the in-order engine."""
    params = [sampling(i) for i in range(3)]
    ref, _ = run(engine(smol, "off"), prompts[:3], params)
    eng = engine(smol, "on")
    eng.barrier = lambda seq: (len(seq.output_ids) + seq.in_flight) % 5 == 0
    at_rest = []
    seqs = [eng.add_request(p, s) for p, s in zip(prompts[:3], params)]
    while eng.has_work():
        for out in eng.step():
            if len(out.seq.output_ids) % 5 == 0 and not out.finished:
                at_rest.append(out.seq.in_flight == 0 and out.seq.num_cached == out.seq.length - 1)
    assert at_rest and all(at_rest)
    assert [s.output_ids for s in seqs] == [s.output_ids for s in ref]


def test_checkpoints_under_async_scheduling_restore_exactly(smol, prompts, s3_endpoint):  # noqa: F811
    """The checkpointer's barrier: snapshots taken while steps run ahead restore into a fresh engine and
    continue token for token (a slot snapshotted one step ahead of its tokens would not)."""
    cfg = make_config(*s3_endpoint).model_copy(update={"interval_tokens": 4})
    store, ckpt = ObjectStore(cfg), Checkpointer(ObjectStore(cfg), cfg)
    params = [sampling(i, max_tokens=26) for i in range(2)]
    eng = engine(smol, "on")
    eng.barrier = ckpt.due_next
    seqs = [eng.add_request(p, s) for p, s in zip(prompts[1:3], params)]
    snapshots = 0
    while min(len(s.output_ids) for s in seqs) < 17:
        outs = eng.step()
        snapshots += sum(not o.seq.in_flight and ckpt.due_next(o.seq) for o in outs)
        ckpt.after_step([o.seq for o in outs])
    assert snapshots >= 8 and ckpt.flush(60) and ckpt.failures_total == 0
    while eng.has_work():
        eng.step()
    restored = {r.request_id: r for r in load_slot(store, cfg.slot)}
    fresh = engine(smol, "off")
    resumed = [resume_into(fresh, restored[s.request_id]) for s in seqs]
    assert all(restored[s.request_id].status == "exact" for s in seqs)
    assert all(len(r.output_ids) >= 16 for r in resumed)
    while fresh.has_work():
        fresh.step()
    assert [r.output_ids for r in resumed] == [s.output_ids for s in seqs]
    ckpt.close()
