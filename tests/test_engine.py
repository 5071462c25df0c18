"""The engine on the real embedded model: exactness against transformers, batching, sampling."""

from __future__ import annotations

import torch

from slam.engine.pool import SlotPool
from slam.engine.sequence import SamplingParams
from tests.conftest import make_engine

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers."}],
]


def test_full_matches_transformers_generate(smol):
    engine = make_engine(smol, "full")
    for messages in PROMPTS:
        prompt = engine.encode_chat(messages)
        with torch.no_grad():
            out = smol.model.generate(torch.tensor([prompt], device=smol.device), max_new_tokens=32, do_sample=False)
        expected = out[0, len(prompt):].tolist()
        [seq] = engine.generate([prompt], SamplingParams(max_tokens=32))
        # transformers stops at the end-of-sequence token too, so both sequences must agree entirely.
        assert seq.output_ids == expected


def test_batch_equals_alone(smol):
    texts = ["Tell me about cats.", "Why is the sky blue? Explain in detail, please, for a child of ten.",
             "Hi", "Name a famous physicist and describe one discovery they made, with dates."]
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    for policy, budget in (("full", None), ("slam", 72)):
        engine = make_engine(smol, policy, budget=budget, sink=4, recent=16, prefill_chunk=32)
        prompts = [engine.encode_chat([{"role": "user", "content": t}]) for t in texts]
        assert len({len(p) for p in prompts}) == 4
        alone = [engine.generate([p], greedy)[0].output_ids for p in prompts]
        together = [s.output_ids for s in engine.generate(prompts, greedy)]
        assert together == alone, policy


def test_requests_join_and_leave_between_steps(smol):
    engine = make_engine(smol, "slam", budget=96, sink=4, recent=16)
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    a = engine.add_request(engine.encode("The first request"), greedy)
    for _ in range(5):
        engine.step()
    b = engine.add_request(engine.encode("A second request arrives later"), greedy)
    while engine.has_work():
        engine.step()
    assert len(a.output_ids) == len(b.output_ids) == 12
    assert engine.generate([b.prompt_ids], greedy)[0].output_ids == b.output_ids


def test_seeded_sampling_is_reproducible_and_seed_dependent(smol):
    engine = make_engine(smol, "slam", budget=128, sink=4, recent=32)
    prompt = engine.encode("Once upon a time")
    def run(seed):
        return engine.generate([prompt], SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=seed, ignore_eos=True))[0].output_ids
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_strings_and_max_tokens(smol):
    engine = make_engine(smol, "full")
    prompt = engine.encode("1, 2, 3, 4, 5,")
    [seq] = engine.generate([prompt], SamplingParams(max_tokens=40, stop=[" 9"]))
    assert seq.finish_reason == "stop" and " 9" not in seq.output_text and "8" in seq.output_text
    [seq] = engine.generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True))
    assert seq.finish_reason == "length" and len(seq.output_ids) == 5


def test_slam_cache_bounded_after_three_budgets_of_generation(smol):
    budget = 80
    engine = make_engine(smol, "slam", budget=budget, sink=4, recent=16)
    pool = engine.runner.pool
    seq = engine.add_request(engine.encode("Write a long story about a dragon."), SamplingParams(max_tokens=3 * budget, ignore_eos=True))
    held = 0
    while engine.has_work():
        engine.step()
        if seq.slot is not None:
            held = max(int((pos[seq.slot] >= 0).sum(dim=-1).max()) for pos in pool.pos)
            assert held <= budget and seq.cache_tokens() <= budget
    assert len(seq.output_ids) == 3 * budget
    assert held == budget
    assert seq.replacements > 0


def test_pool_keeps_shape_and_storage_while_requests_come_and_go(smol):
    """200 decode steps with requests joining and leaving: the pool's tensors are never reallocated."""
    engine = make_engine(smol, "slam", budget=64, sink=4, recent=16, max_batch=4)
    pool = engine.runner.pool
    engine.add_request(engine.encode("warm up the reserve " * 30), SamplingParams(max_tokens=2))
    while engine.has_work():
        engine.step()
    before = [(t.data_ptr(), t.shape) for group in (pool.k, pool.v, pool.pos, pool.rk, pool.rv) for t in group]
    texts = ["alpha", "a somewhat longer request about birds and trees", "short", "numbers 1 2 3 4 5 6 7"]
    steps, added = 0, 0
    while steps < 200:
        if added < 12 and len(engine.scheduler.running) + len(engine.scheduler.waiting) < 4:
            engine.add_request(engine.encode(texts[added % 4]), SamplingParams(max_tokens=10 + 7 * (added % 5), ignore_eos=True))
            added += 1
        engine.step()
        steps += 1
        assert [(t.data_ptr(), t.shape) for group in (pool.k, pool.v, pool.pos, pool.rk, pool.rv) for t in group] == before
    assert added == 12


def test_reserve_capacity_grows_by_size_classes_up_to_the_longest_request():
    """The reserve grows by at least a quarter (amortized appends) to a size class, an eighth of a power of two,
    but never past what a request of max_model_len tokens can evict: rows beyond it would stay empty, and
    exact scoring under CUDA graphs reads the whole capacity."""
    def caps(max_reserve: int) -> list[int]:
        pool = SlotPool(1, 2, 1, 16, 8, torch.float32, torch.device("cpu"), chunk=8, oversample=2,
                        max_reserve=max_reserve)
        out = []
        for need in (300, 400, 700, 1001, 31_932):
            pool.ensure_reserve(need)
            assert pool.rk[0].shape[2] == pool.cap + 1 >= need + 1
            out.append(pool.cap)
        return out

    assert caps(0) == [320, 416, 704, 1024, 32_768]
    assert caps(1000) == [320, 416, 704, 1008, 31_936]  # bounded, then whole chunks for a need beyond the bound


def test_a_prompt_reserve_is_sized_once_for_what_it_evicts(smol):
    """A request's reserve is sized when it takes its slot, for what its prompt will evict: prefill in chunks
    grew it chunk by chunk before, by doubling, and a 32,000-token prompt held a 61,440-row reserve."""
    engine = make_engine(smol, "slam", budget=128, sink=4, recent=32, prefill_chunk=64)
    pool = engine.runner.pool
    prompt = (engine.encode("The quick brown fox jumps over the lazy dog. ") * 200)[:1500]
    versions = pool.version
    [seq] = engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    evicted = seq.policy.counts(len(prompt))[3]
    assert evicted <= pool.cap <= 1.125 * evicted + pool.chunk
    assert pool.version - versions == 1  # one allocation for the prompt, no growth chunk by chunk
