"""Two-stage selection of critical tokens (cache/selection.py): chunk bounds kept in step with the reserve,
bounds that really bound, and the same choices as exact scoring when the first stage keeps every chunk."""

from __future__ import annotations

import pytest
import torch

from slam.cache.selection import dequantize_bounds, upper_bound
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams
from slam.model import resolve_reserve_dtype
from tests.conftest import make_engine

STORY = ("The lighthouse keeper wrote the day's weather in a book. Ships passed at night, and the lamp "
         "turned until morning. ") * 12


def test_upper_bound_bounds_every_key_of_the_chunk():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 16)  # [b, kv_heads, group, head_dim]
    keys = torch.randn(2, 3, 5, 8, 16)  # [b, kv_heads, chunks, chunk, head_dim]
    bound = upper_bound(q, keys.amin(dim=3), keys.amax(dim=3))  # [b, kv_heads, group, chunks]
    exact = torch.einsum("bhgd,bhctd->bhgct", q, keys).amax(dim=-1)
    assert (bound >= exact - 1e-5).all()
    # A chunk of one key is its own box: the bound is attained.
    assert torch.allclose(upper_bound(q, keys[:, :, :, 0], keys[:, :, :, 0]), torch.einsum("bhgd,bhcd->bhgc", q, keys[:, :, :, 0]), atol=1e-5)


def engine_with(smol, oversample: int, chunk: int = 16, capacity: int = 0, every: int = 1, float_scores: bool = False,
                **cache):
    # Two stages start at 4 x the candidates here, the GPUs' default, whatever this machine's default.
    engine = make_engine(smol, "slam", budget=40, sink=4, recent=12, prefill_chunk=64, max_batch=2,
                         select_oversample=oversample, select_chunk=chunk, select_every=every, select_min_ratio=4, **cache)
    # With int8 weights CPUs score from int8 keys, and that kernel rounds scores to bfloat16: near-ties
    # that exact scoring and stage two (softmaxes over other arrays) may order differently. Comparing the
    # stages' choices needs float scores; the other tests here score as the CPU default does.
    engine.runner.pool.int8_scoring = not float_scores and not engine.runner.pool.cache_positions
    engine.runner.pool.ensure_reserve(capacity)  # two stages start at 4 x the candidates (oversample x budget)
    return engine


def run(engine, prompts, steps=24):
    seqs = engine.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))
    return [s.output_ids for s in seqs], [s.replacements for s in seqs]


@pytest.mark.parametrize("cache", [{}, {"position_mode": "cache"}], ids=["original", "cache-positions"])
def test_two_stage_covering_the_reserve_equals_exact(smol, cache):
    """With oversampling that keeps every chunk (and chunks of 7 tokens, so the last is partial), two-stage
    selection picks what exact scoring picks, step for step: same tokens, same churn."""
    exact = engine_with(smol, oversample=0, float_scores=True, **cache)
    prompts = [exact.encode(STORY), exact.encode(STORY[:300])]
    assert 200 < len(prompts[0]) < 330  # the reserve stays within the 360 candidates
    tokens, churn = run(exact, prompts)
    assert min(churn) > 0
    two_stage = engine_with(smol, oversample=15, chunk=7, capacity=4 * 15 * 40, float_scores=True, **cache)
    assert two_stage.runner.pool.two_stage and not exact.runner.pool.two_stage
    assert run(two_stage, prompts) == (tokens, churn)


def test_a_narrow_request_in_a_wide_pool_rescores_the_measured_candidates(smol):
    """A pool sized for max_budget 400 takes oversampling 4 from that budget's middle. A budget-40 request (24
    critical columns) still rescores budget 256's 1,504 candidate tokens, not 4 x 24, and here those cover its
    whole reserve, so it picks what exact scoring picks, step for step."""
    exact = engine_with(smol, oversample=0, float_scores=True)
    prompts = [exact.encode(STORY), exact.encode(STORY[:300])]
    tokens, churn = run(exact, prompts)
    wide = engine_with(smol, oversample=None, chunk=8, capacity=4 * 4 * 400, float_scores=True, max_budget=400)
    pool = wide.runner.pool
    assert pool.two_stage and (pool.oversample, pool.candidate_floor) == (4, 8 * 188)
    assert run(wide, prompts) == (tokens, churn)


def assert_bounds_hold(pool, layer: int, slot: int, keys: torch.Tensor, chunk: int, chunks: int, loose: int) -> None:
    """The int8 bounds of chunks [0, chunks) contain every key of their chunk (keys [kv_heads, n, head_dim]),
    and lie within `loose` steps of their scale from the keys' true minimum and maximum."""
    smin, smax = dequantize_bounds(*pool.bounds_of(layer, slice(0, slot + 1), chunks), torch.float32)
    scale = pool.sscale[layer][slot, :, :chunks].unsqueeze(-1)  # [kv_heads, chunks, 1]
    for c in range(chunks):
        part = keys[:, c * chunk : (c + 1) * chunk].float()
        lo, hi, s = smin[slot, :, c], smax[slot, :, c], scale[:, c]
        assert (lo <= part.amin(dim=1)).all() and (hi >= part.amax(dim=1)).all()
        assert (part.amin(dim=1) - lo <= loose * s).all() and (hi - part.amax(dim=1) <= loose * s).all()


def test_refresh_every_4_covering_the_reserve_equals_exact(smol):
    """Stage one refreshes each layer's chunks every 4 steps; in between its chosen chunks, with the chunks
    of tokens evicted since, are re-ranked by each step's query. When the chunks cover the reserve, that is
    exact selection at every step: same tokens, same churn."""
    exact = engine_with(smol, oversample=0, float_scores=True)
    prompts = [exact.encode(STORY), exact.encode(STORY[:300])]
    tokens, churn = run(exact, prompts)
    every4 = engine_with(smol, oversample=15, chunk=7, capacity=4 * 15 * 40, every=4, float_scores=True)
    assert every4.runner.pool.two_stage
    assert run(every4, prompts) == (tokens, churn)


def test_exact_selection_picks_at_every_step_whatever_the_refresh_interval(smol):
    """`select_every` spaces stage one of two-stage selection only: exact selection (a reserve below the
    two-stage threshold) picks by each step's query, so r = 4 decodes what r = 1 decodes, with the same churn."""
    every1 = engine_with(smol, oversample=0, float_scores=True)
    prompts = [every1.encode(STORY), every1.encode(STORY[:300])]
    every4 = engine_with(smol, oversample=0, every=4, float_scores=True)
    assert not every4.runner.pool.two_stage and every4.runner.select_every == 4
    assert run(every4, prompts) == run(every1, prompts)


def test_refresh_every_4_with_few_chunks_picks_valid_tokens(smol):
    """With one chunk per critical column, picks between refreshes are still distinct evicted tokens."""
    engine = engine_with(smol, oversample=1, chunk=16, every=4)
    seq = engine.add_request(engine.encode(STORY), SamplingParams(max_tokens=12, ignore_eos=True))
    for _ in range(11):
        engine.step()
    pool, policy = engine.runner.pool, seq.policy
    assert pool.two_stage
    evicted = set(pool.rpos[seq.slot, : policy.counts(seq.num_cached)[3]].tolist())
    middle = slice(policy.sink, policy.sink + policy.middle)
    for layer in range(pool.layers):
        for head in pool.pos[layer][seq.slot, :, middle]:
            assert len(set(head.tolist())) == policy.middle and set(head.tolist()) <= evicted


def test_summaries_track_the_reserve(smol):
    """Two stages start when the reserve grows past 4 x 2 x 40 tokens: the bounds are rebuilt from what it
    holds, then kept by the decode steps after; each chunk's int8 bounds hold its keys, within a step of
    their scale per time the scale grew while the chunk filled."""
    engine = engine_with(smol, oversample=2, chunk=16)
    seq = engine.add_request(engine.encode(STORY), SamplingParams(max_tokens=30, ignore_eos=True))
    pool = engine.runner.pool
    assert not pool.two_stage
    for _ in range(30):  # the prompt's reserve holds fewer rows: two stages start when decoding grows it
        engine.step()
        if pool.two_stage:
            break
    for _ in range(5):  # and the bounds are kept by the steps after
        engine.step()
    assert pool.two_stage and pool.smin[0].dtype == torch.int8
    while seq.policy.counts(seq.num_cached)[3] % 16 == 0:  # stop inside a chunk: a partial last one
        engine.step()
    n = seq.policy.counts(seq.num_cached)[3]
    assert n > 100
    for layer in range(pool.layers):
        keys = pool.reserve_keys(layer, scoring=True)[seq.slot, :, :n]  # [kv_heads, n, head_dim]
        assert_bounds_hold(pool, layer, seq.slot, keys, 16, -(-n // 16), loose=16)


def test_restored_summaries_equal_the_originals(smol):
    """load_state rebuilds the chunk bounds from the restored reserve: they hold its keys within one step of
    their scale (rounding outward), and equal the bounds of chunks the source computed whole."""
    # Two stages from the start (a capacity of 4 x the candidates), so the source summarizes at prefill.
    src, dst = engine_with(smol, oversample=2, capacity=320), engine_with(smol, oversample=2, capacity=320)
    seq = src.add_request(src.encode(STORY), SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(15):
        src.step()
    state = seq.policy.state(seq.pool, seq.slot, seq.num_cached)
    dst.runner.pool.ensure_reserve(src.runner.pool.cap)
    with torch.inference_mode():  # as the restore path runs it
        seq.policy.load_state(dst.runner.pool, 1, state)
    n = seq.policy.counts(seq.num_cached)[3]
    pool = dst.runner.pool
    for layer in range(pool.layers):
        keys = pool.reserve_keys(layer, scoring=True)[1, :, :n]
        assert_bounds_hold(pool, layer, 1, keys, 16, -(-n // 16), loose=1)
    # The prompt's chunks were summarized whole at prefill, on both sides.
    whole = (len(seq.prompt_ids) - seq.policy.sink - seq.policy.ring) // 16
    for name in ("smin", "smax", "sscale"):
        a, b = getattr(src.runner.pool, name), getattr(pool, name)
        for layer in range(len(a)):
            assert torch.equal(a[layer][seq.slot, :, :whole], b[layer][1, :, :whole])


def test_two_stage_picks_are_valid_reserve_tokens(smol):
    """With few candidates (one chunk's worth per critical column) the middle still holds distinct tokens
    that were evicted, at their original positions, and never the scratch index."""
    engine = engine_with(smol, oversample=1, chunk=16)
    seq = engine.add_request(engine.encode(STORY), SamplingParams(max_tokens=10, ignore_eos=True))
    for _ in range(6):
        engine.step()
    pool, policy = engine.runner.pool, seq.policy
    n = policy.counts(seq.num_cached)[3]
    evicted = set(pool.rpos[seq.slot, :n].tolist())
    middle = slice(policy.sink, policy.sink + policy.middle)
    for layer in range(pool.layers):
        pos = pool.pos[layer][seq.slot, :, middle]  # [kv_heads, middle]
        for head in pos:
            assert len(set(head.tolist())) == policy.middle and set(head.tolist()) <= evicted


def test_scores_keep_their_order_where_probabilities_underflow():
    """Over a long reserve most softmax probabilities are exactly 0, and top-k among equal zeros picks
    arbitrarily (on a GPU, differently from run to run). Log-probabilities keep the true order."""
    from slam.cache.selection import group_scores

    q = torch.zeros(1, 1, 1, 4)
    q[..., 0] = 1.0
    keys = torch.zeros(1, 1, 300, 4)
    keys[0, 0, :, 0] = torch.linspace(-2000.0, 0.0, 300)  # logits 2000 apart: all but the last underflow
    stored = torch.ones(1, 1, 300, dtype=torch.bool)
    scores = group_scores(q, keys, stored, scale=1.0)
    assert torch.softmax(keys[0, 0, :, 0], dim=0)[:-20].eq(0).all()  # the probabilities would all tie
    assert scores[0, 0].topk(10).indices.tolist() == list(range(299, 289, -1))


@torch.inference_mode()
def test_churn_counts_chosen_tokens_that_no_middle_column_held():
    from slam.cache.slam import keep_columns

    # Slot 0 head 0 holds reserve tokens 3, 7, 9 (one column empty); head 1 holds 1, 2, 3, 4. Slot 1 is not
    # slam's: none of its columns is usable, and it counts nothing.
    held = torch.tensor([[[3, 7, -1, 9], [1, 2, 3, 4]], [[5, 5, 5, 5], [5, 5, 5, 5]]])
    idx = torch.tensor([[[9, 3, 8, 11], [4, 3, 2, 1]], [[5, 5, 5, 5], [5, 5, 5, 5]]])
    score = torch.zeros(idx.shape)
    score[0, 0, 3] = float("-inf")  # a pick that found nothing is no newcomer
    usable = torch.tensor([True, False]).view(2, 1, 1).expand(-1, 2, 4)
    out_idx, out_score, churn = keep_columns(held, idx, score, usable)
    assert churn.tolist() == [1, 0]  # only token 8 is new (11 found nothing); head 1 chose the same set
    assert out_idx[0, 0].tolist()[:2] == [3, 8] and out_idx[0, 0, 3] == 9  # 3 and 9 stay, 8 takes 7's column
    assert out_score[0, 0, 2] == float("-inf")  # the column nothing fills is emptied
    assert out_idx[0, 1].tolist() == [1, 2, 3, 4]


def test_int8_scoring_ranks_like_float_scoring():
    """CPU exact scoring multiplies the query, rounded to int16, by int8 keys with one scale per key
    (selection.dot_int8): within the keys' rounding of q.k, a slot scores the same alone or in a batch, and the
    clear winners are the float winners."""
    from slam.cache.selection import dot_float, dot_int8
    from slam.engine.pool import quantize_rows

    torch.manual_seed(0)
    q, keys = torch.randn(3, 2, 4, 64), torch.randn(3, 2, 500, 64)  # [b, kv_heads, group, d], [b, kv_heads, m, d]
    keys[:, :, 123] = 3 * q.mean(dim=2)  # one key every query of the group favours
    k8, s = quantize_rows(keys, torch.bfloat16)
    assert k8.dtype == torch.int8 and s.dtype == torch.bfloat16
    dots, exact = dot_int8(q, k8, s), dot_float(q, keys)
    assert torch.allclose(dots, exact, rtol=2**-7, atol=0.05 * exact.abs().max().item())
    assert (dots.amax(dim=2).argmax(dim=-1) == 123).all()
    alone = dot_int8(q[1:2], k8[1:2], s[1:2])
    assert torch.equal(alone, dots[1:2])


def test_tied_scores_pick_the_same_tokens_however_long_the_array():
    """Scores can tie (equal keys, or low-precision dots); the picks among ties go to the lower reserve index, so
    a slot picks the same tokens whether the step scores 40 indices or 3,000 (the span follows the longest
    reserve of the batch)."""
    from slam.cache.selection import exact_top

    torch.manual_seed(0)
    n, kc = 40, 12
    dots = torch.randint(0, 4, (1, 2, 3, n)).float()  # [b, kv_heads, group, m]: four values, many ties
    picks = []
    for span in (n, 64, 3000):
        padded = torch.cat([dots, torch.randn(1, 2, 3, span - n)], dim=-1)
        rpos = torch.arange(span).view(1, -1)
        idx, score = exact_top(padded, rpos, torch.tensor([n]), kc, 1.0, ties=True)
        picks.append(idx.sort(dim=-1).values)
        # Lower indices win among equal scores: no unpicked index ties a pick with a lower index beyond it.
        best = score.amin(dim=-1, keepdim=True)
        scores = torch.log_softmax(dots, dim=-1).amax(dim=2)
        tied_unpicked = (scores == best) & ~torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)
        for h in range(2):
            left = tied_unpicked[0, h].nonzero().flatten()
            assert left.numel() == 0 or left.min() > idx[0, h][score[0, h] == best[0, h]].max()
    assert torch.equal(picks[0], picks[1]) and torch.equal(picks[0], picks[2])


def test_the_reserve_dtype_auto_is_int8_on_gpus_serving_past_32k_and_the_cache_dtype_elsewhere(smol):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_reserve_dtype("auto", cuda, 131072) == "int8"
    assert resolve_reserve_dtype("auto", cuda, 8192) == resolve_reserve_dtype("auto", cuda, 32768) == "bfloat16"
    assert resolve_reserve_dtype("auto", cpu, 131072) == "bfloat16"
    assert resolve_reserve_dtype("bfloat16", cuda, 131072) == "bfloat16"
    assert resolve_reserve_dtype("int8", cpu, 8192) == "int8"
    engine = make_engine(smol, "slam", budget=24, sink=2, recent=8)  # the default: auto
    assert engine.config.reserve_dtype == "auto" and not engine.runner.pool.reserve_int8
    cache = CacheConfig(policy="slam", budget=24, sink=2, recent=8)
    assert LLMEngine(EngineConfig(max_batch=2, cache=cache, reserve_dtype="int8"), smol).runner.pool.reserve_int8


def test_oversampling_pairs_with_the_refresh_interval_unless_set(smol):
    """Chunks chosen at a refresh serve r - 1 more queries: from r = 3 on, unset oversampling doubles to 16 (r = 4
    with 8 lost a needle more than the target allows at 8K); a set value, 0 (exact) included, is kept."""
    from slam.cli.serve import settings_from
    from slam.config import oversample_for

    assert [oversample_for(r, None) for r in (1, 2, 3, 4, 8)] == [8, 8, 16, 16, 16]
    assert oversample_for(4, 8) == 8 and oversample_for(4, 0) == 0 and oversample_for(1, 16) == 16
    cache = CacheConfig(policy="slam", budget=256, sink=4, recent=64)  # the 188 columns the pairing was measured at
    for every, oversample, want in ((1, None, 8), (4, None, 16), (4, 8, 8), (2, 0, 0)):
        engine = LLMEngine(EngineConfig(max_batch=1, cache=cache, select_every=every, select_oversample=oversample), smol)
        assert engine.runner.pool.oversample == want, (every, oversample)
    args = type("Args", (), {"select_every": "4", "select_oversample": None})()
    assert settings_from(args).engine_config().select_oversample is None  # resolved by the engine, as above


def test_larger_middles_keep_the_candidate_tokens_measured_at_budget_256(smol):
    """Unset oversampling was measured for budget 256's 188 critical columns; any other middle rescores as many
    candidate tokens (at least twice its columns), so budget 2048 does not rescore its whole 32K reserve, and
    budget 128 does not rescore a third as many (which lost needles at 4K)."""
    from slam.config import oversample_for

    assert [oversample_for(4, None, m) for m in (60, 188, 444, 956, 1980, 8000)] == [51, 16, 7, 4, 2, 2]
    assert [oversample_for(1, None, m) for m in (0, 12, 60, 188, 444, 1980)] == [2, 126, 26, 8, 4, 2]
    assert oversample_for(4, 16, 1980) == 16 and oversample_for(4, 0, 1980) == 0  # set values are kept
    for budget, every, want in ((128, 1, 26), (256, 4, 16), (512, 4, 7), (2048, 4, 2), (2048, 1, 2)):
        cache = CacheConfig(policy="slam", budget=budget, sink=4, recent=64)
        engine = LLMEngine(EngineConfig(max_batch=1, cache=cache, select_every=every), smol)
        assert engine.runner.pool.oversample == want, (budget, every)
    # The pool's widest slot decides its multiple (requests may ask for up to max_budget), but a step of narrower
    # requests still rescores the measured count of candidate tokens, as a pool of their own budget would.
    cache = CacheConfig(policy="slam", budget=256, sink=4, recent=64)
    wide = LLMEngine(EngineConfig(max_batch=1, cache=cache, max_budget=2048, select_every=4), smol).runner.pool
    own = LLMEngine(EngineConfig(max_batch=1, cache=cache, select_every=4), smol).runner.pool
    assert wide.oversample == 2 and own.oversample == 16
    assert wide.first_chunks(188) == own.first_chunks(188) == 16 * 188 // 8
    assert wide.first_chunks(1980) == 2 * 1980 // 8 and wide.first_chunks(60) == 16 * 188 // 8
    set_ = LLMEngine(EngineConfig(max_batch=1, cache=cache, max_budget=2048, select_oversample=3), smol).runner.pool
    assert set_.first_chunks(188) == -(-3 * 188 // 8)  # a set multiple is kept as it is


def test_two_stages_start_at_four_times_the_candidates_unless_set(smol):
    """By default two-stage selection starts once the reserve holds 4 x its candidates, on CPUs as on GPUs
    (budget 256: at 8K); a set ratio is kept."""
    cache = CacheConfig(policy="slam", budget=24, sink=2, recent=8)
    for settings, starts_at in (({}, 4), ({"select_min_ratio": 2}, 2)):
        pool = LLMEngine(EngineConfig(max_batch=1, cache=cache, **settings), smol).runner.pool
        candidates = pool.oversample * pool.budget
        pool.ensure_reserve((starts_at - 1) * candidates)
        assert not pool.two_stage, settings
        pool.ensure_reserve(starts_at * candidates)
        assert pool.two_stage, settings
