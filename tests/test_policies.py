"""Every cache policy, checked on the same work. Adding a policy adds one entry to POLICY_CASES."""

from __future__ import annotations

import pytest
import torch

from slam.cache import POLICIES
from slam.engine.sequence import SamplingParams
from tests.conftest import make_engine

# (policy, extra cache settings): each bounded entry is held to the budget and, with a budget larger
# than the work, to the output of `full`.
POLICY_CASES = [
    ("streaming", {}),
    ("streaming", {"position_mode": "cache"}),
    ("slam", {}),
    ("slam", {"position_mode": "cache"}),
    ("snapkv", {}),
    ("h2o", {}),
]


def test_every_registered_policy_is_covered():
    assert {p for p, _ in POLICY_CASES} | {"full"} == set(POLICIES)


def prompts(tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"]
    return [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("policy,extra", POLICY_CASES, ids=[f"{p}-{e}" for p, e in POLICY_CASES])
def test_large_budget_equals_full(tiny, policy, extra):
    greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    reference = [s.output_ids for s in make_engine(tiny, "full").generate(prompts(tiny.tokenizer), greedy)]
    engine = make_engine(tiny, policy, budget=200, sink=4, recent=16, prefill_chunk=8, **extra)
    assert [s.output_ids for s in engine.generate(prompts(tiny.tokenizer), greedy)] == reference


@pytest.mark.parametrize("policy,extra", POLICY_CASES, ids=[f"{p}-{e}" for p, e in POLICY_CASES])
def test_cache_stays_within_budget(tiny, policy, extra):
    budget = 24
    engine = make_engine(tiny, policy, budget=budget, sink=2, recent=8, prefill_chunk=16, **extra)
    sizes = []
    pool = engine.runner.pool

    def record(out):
        if out.seq.slot is not None:
            # Columns holding a token, per layer and KV head, in this request's slot.
            sizes.extend(int(n) for pos in pool.pos for n in (pos[out.seq.slot] >= 0).sum(dim=-1).flatten())
            assert out.seq.cache_tokens() == max(sizes[-len(pool.pos) * pool.kv_heads:])

    long_prompt = tiny.tokenizer.encode("word " * 100)
    engine.generate([long_prompt], SamplingParams(max_tokens=3 * budget, ignore_eos=True), on_output=record)
    assert max(sizes) <= budget
    assert max(sizes) == budget  # the budget is actually used, not just respected


def sink_window_reference(model, prompt: list[int], sink: int, window: int, steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence each step with a sink + sliding-window mask."""
    ids = list(prompt)
    for _ in range(steps):
        n = len(ids)
        i = torch.arange(n).view(-1, 1)
        j = torch.arange(n).view(1, -1)
        visible = (j <= i) & ((j < sink) | (i - j < window))
        mask = torch.zeros(n, n).masked_fill(~visible, float("-inf")).view(1, 1, n, n).to(model.device)
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=model.device), attention_mask=mask).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_streaming_equals_sink_window_reference(tiny):
    model = tiny.model
    model.set_attn_implementation("eager")
    prompt = tiny.tokenizer.encode("Counting sheep: one sheep, two sheep, three sheep, four sheep, five sheep.")
    sink, budget = 3, 12
    expected = sink_window_reference(model, prompt, sink, budget - sink, steps=30)
    engine = make_engine(tiny, "streaming", budget=budget, sink=sink, recent=4, prefill_chunk=5)
    [seq] = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))
    assert seq.output_ids == expected


def test_slam_recalls_from_reserve_and_replaces_on_the_fly(tiny):
    engine = make_engine(tiny, "slam", budget=24, sink=2, recent=8, prefill_chunk=16)
    [seq] = engine.generate([tiny.tokenizer.encode("alpha beta gamma " * 30)], SamplingParams(max_tokens=40, ignore_eos=True))
    assert seq.replacements > 0


@pytest.mark.parametrize("policy", ["full", "streaming", "slam", "slam-int8-scoring", "h2o"])
def test_batched_pool_equals_per_request_reference(tiny, policy):
    """Four requests decoded together on the pool equal a plain per-request implementation of the policy
    (tests/reference_policies.py), through many replacements of the middle tokens; slam also with the
    int8 scoring that CPUs use with int8 weights (here over float32 weights, as the reference has them)."""
    from tests.reference_policies import reference_generate

    budget, sink, recent, steps = 16, 2, 4, 48
    texts = ["alpha beta", "one two three", "x", "The quick brown"]
    prompts = [tiny.tokenizer.encode(t)[:sink + recent] for t in texts]  # evictions all happen in decode
    cache = {} if policy == "full" else {"budget": budget, "sink": sink, "recent": recent}
    int8_scoring = policy.endswith("int8-scoring")
    policy = policy.removesuffix("-int8-scoring")
    engine = make_engine(tiny, policy, **cache)
    engine.runner.pool.int8_scoring = int8_scoring  # before the reserve exists: its int8 copies come with it
    seqs = engine.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))
    for prompt, seq in zip(prompts, seqs):
        assert seq.output_ids == reference_generate(tiny.model, prompt, steps, policy, budget, sink, recent,
                                                    int8_scoring=engine.runner.pool.int8_scoring)
    if policy == "slam":
        assert sum(s.replacements for s in seqs) > steps  # the critical set kept changing


@pytest.mark.parametrize("policy", ["h2o", "slam"])
def test_reused_engine_never_reads_what_idle_slots_wrote(tiny, policy):
    """Slots that sit idle in a decode step (free, or prefilling) must not leave NaN or stale values for
    their next request: a reused engine gives each batch the tokens a fresh engine gives it."""
    import random

    def engine():
        return make_engine(tiny, policy, budget=32, sink=4, recent=8, max_budget=64, prefill_chunk=16)

    reused = engine()
    prompts = [tiny.tokenizer.encode(f"item {i} " * n) for i, n in enumerate([2, 9, 3, 14, 5, 11])]
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    rng = random.Random(0)
    for _ in range(5):
        batch = [prompts[i] for i in rng.sample(range(len(prompts)), rng.randint(2, len(prompts)))]
        errors = []
        seqs = reused.generate(batch, greedy, on_output=lambda out: errors.append(out.error) if out.error else None)
        assert not errors
        assert [s.output_ids for s in seqs] == [s.output_ids for s in engine().generate(batch, greedy)]
