"""Slam's C++ CPU ops (server/slam/cache/cpu_kernels.py) give exactly what the torch code they replace gives:
the int8 scoring and selection (exact, and both stages of two), the group's best reserve tokens with ties
broken by reserve index, the placement with its churn count, the reserve append and the chunk bounds."""

from __future__ import annotations

import copy

import pytest
import torch
from slam.bench.shapes import SHAPES, random_model, synthetic_request
from slam.cache import cpu_kernels
from slam.cache.selection import candidate_top, candidates, chunk_top_int8, dot_int8, exact_top, top_by_index
from slam.cache.slam import place
from slam.config import CacheConfig, EngineConfig
from slam.engine import bounds
from slam.engine.bounds import ChunkBounds
from slam.engine.engine import LLMEngine
from slam.engine.pool import quantize_rows
from slam.engine.sequence import SamplingParams

from tests.fused_writes import compare_ring, random_pool

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: the torch code runs instead")


def bf16_dots(g: torch.Generator, *shape: int) -> torch.Tensor:
    # Rounded to bfloat16 as dot_int8's are, so that many scores tie exactly.
    return torch.randn(*shape, generator=g).to(torch.bfloat16).float()


@pytest.mark.parametrize("seed", range(4))
def test_exact_top_equals_torch_with_ties_and_empty_slots(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, group, m, kc = 3, 3, 3, 700, 188
    dots = bf16_dots(g, b, h, group, m).clamp(-1, 1).mul(4).round()  # few distinct values: ties everywhere
    rpos = torch.arange(m).expand(b, -1).clone()
    rpos[1, ::7] = -1  # indices that hold nothing
    n = torch.tensor([m, 400, 0])  # the last slot has stored nothing yet
    want = exact_top(dots, rpos, n, kc, 0.125, ties=True)
    got = exact_top(dots, rpos, n, kc, 0.125, ties=True, cpu=True)
    found = want[1] > float("-inf")
    assert torch.equal(want[1], got[1])
    assert torch.equal(want[0][found], got[0][found])  # picks that found nothing may be any index


@pytest.mark.parametrize("m", [5, 16, 203, 1000])
def test_group_top_equals_top_by_index_on_every_vector_path(m, scoring_level):
    """The top-k's passes over a row (the group's maximum, the bins, the keys) run as AVX-512 loops or as loops the
    compiler vectorizes; both give the torch code's picks, at lengths with a tail and without, with zeros of both
    signs tied, tokens not stored and a slot that stored nothing."""
    g = torch.Generator().manual_seed(m)
    b, h, group, kc = 2, 3, 3, min(m, 188)
    lp = bf16_dots(g, b, h, group, m).clamp(-1, 1).mul(4).round().sub(4)  # few distinct values: ties everywhere
    lp[0, :, :, ::3] = -0.0  # the group's maximum is a zero: -0.0 here, 0.0 where one query has 0.0
    lp[0, :, 1, ::6] = 0.0
    stored = torch.rand(b, 1, m, generator=g) > 0.2
    stored[1] = False
    order = torch.randperm(b * h * m, generator=g).view(b, h, m)
    for index in (None, order):
        scores = lp.amax(2).masked_fill(~stored, float("-inf"))
        want = top_by_index(scores, torch.arange(m) if index is None else index, kc)
        got = cpu_kernels.group_top(lp, stored, kc, index)
        found = want[1] > float("-inf")
        assert torch.equal(want[1], got[1]) and int(found.sum()) > 0
        picked = want[0] if index is None else index.gather(-1, want[0])  # the keyed op returns the tie keys
        assert torch.equal(picked[found], got[0][found])


@pytest.mark.parametrize("seed", range(3))
def test_exact_top_int8_equals_scoring_then_exact_top(seed):
    """The fused int8 path: integer scoring per slot and head, the masked log-softmax and top-k, as the torch
    code computes them, over views of a larger reserve (as the pool passes them)."""
    g = torch.Generator().manual_seed(seed)
    b, h, group, d, cap, span, kc = 3, 3, 3, 64, 900, 700, 188
    keys = torch.randint(-127, 128, (b + 1, h, cap, d), generator=g, dtype=torch.int8)[:b, :, :span]
    scales = (torch.rand(b + 1, h, cap, generator=g) / 50).to(torch.bfloat16)[:b, :, :span]
    q = torch.randn(b, h, group, d, generator=g)
    rpos = torch.arange(cap).expand(b + 1, -1).clone()
    rpos[1, ::5] = -1  # indices that hold nothing
    rpos = rpos[:b, :span]
    n = torch.tensor([span, 300, 0])
    want = exact_top(dot_int8(q, keys, scales), rpos, n, kc, 0.125, ties=True)
    got = cpu_kernels.exact_top_int8(q, keys, scales, rpos, n, kc, 0.125)
    found = want[1] > float("-inf")
    assert torch.equal(want[1], got[1]) and int(found.sum()) > 0
    assert torch.equal(want[0][found], got[0][found])


@pytest.fixture(params=["avx512", "avx2", "default"])
def scoring_level(request):
    """Each vector path of the integer scoring in turn, on CPUs that run it (the level is restored after)."""
    best = cpu_kernels.scoring_level()
    got = cpu_kernels.scoring_level(request.param)
    if got != request.param:
        cpu_kernels.scoring_level(best)
        pytest.skip(f"this CPU does not run the {request.param} path")
    yield got
    cpu_kernels.scoring_level(best)


def test_scoring_level_is_capped_not_raised():
    best = cpu_kernels.scoring_level()
    try:
        assert cpu_kernels.scoring_level("default") == "default"
        assert cpu_kernels.scoring_level("no-such-level") == best  # unknown names mean the best the CPU runs
        assert cpu_kernels.scoring_level("") == best  # asking changes nothing
    finally:
        cpu_kernels.scoring_level(best)


@pytest.mark.parametrize("d, m, b", [(64, 701, 2), (128, 64, 2), (48, 37, 2), (64, 3937, 1), (64, 1513, 1)])
def test_int8_scoring_is_exact_whatever_the_kernel(d, m, b, scoring_level):
    """The C++ scoring sums int16 x int8 products in int32 (AVX-512, AVX2 or scalar, vectorized where d is a
    multiple of 32, a scalar loop otherwise, and for the last m % 8 keys; one slot's keys split between the
    threads): extreme values do not overflow and every path gives the torch code's values bit for bit, ties
    included (duplicate keys rank by reserve index)."""
    g = torch.Generator().manual_seed(d + m)
    h, group, kc = 3, 4, min(16, m)
    keys = torch.randint(-128, 128, (b, h, m, d), generator=g, dtype=torch.int8)
    keys[0, 0, : m // 2] = 127  # the largest products: int16 32767 x 127 over every dimension
    keys[-1, :, 1::2] = keys[-1, :, ::2][:, : m // 2]  # duplicates: equal scores
    scales = torch.rand(b, h, m, generator=g) / 50
    q = torch.randn(b, h, group, d, generator=g) * torch.logspace(-3, 3, d)  # a wide range within a row
    q[0, 0, 0] = q[0, 0, 0].abs() + 1  # max |q| at a positive entry: rounds to 32767
    rpos = torch.arange(m).expand(b, -1).clone()
    n = torch.tensor([m, m - 3])[:b]
    want = exact_top(dot_int8(q, keys, scales), rpos, n, kc, d**-0.5, ties=True)
    poison = torch.full((b, h, group, m), float("nan"))  # freed memory the op's logits may reuse: NaN, so that
    del poison  # a logit the op failed to write cannot pass for the right one
    got = cpu_kernels.exact_top_int8(q, keys, scales, rpos, n, kc, d**-0.5)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    dots = dot_int8(q, keys, scales).double() / (selection_scales(q) * scales.double().unsqueeze(-2))
    assert torch.equal(dots.round(), dots.round().clamp(-(2**31), 2**31 - 1))  # no int32 overflow possible


def selection_scales(q: torch.Tensor) -> torch.Tensor:
    from slam.cache.selection import quantize_query

    return quantize_query(q)[1].double()


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_candidate_top_int8_equals_gather_scoring_then_candidate_top(scale_dtype, scoring_level):
    """Stage two between refreshes: the tokens of the chosen chunks scored where they lie in the whole reserve,
    masked (beyond n, empty indices, repeated chunks) and ranked with ties by reserve index, as the torch code
    does after gathering them."""
    g = torch.Generator().manual_seed(11)
    slots, b, h, group, d, chunk, cap_chunks, nc, kc = 4, 3, 3, 3, 64, 8, 125, 50, 100
    rows = cap_chunks * chunk + 1
    keys = torch.randint(-127, 128, (slots, h, rows, d), generator=g, dtype=torch.int8)
    keys[1, :, 8:16] = keys[1, :, 24:32]  # two chunks of equal keys: ties across chunks
    scales = (torch.rand(slots, h, rows, generator=g) / 50).to(scale_dtype)
    scales[1, :, 8:16] = scales[1, :, 24:32]
    q = torch.randn(b, h, group, d, generator=g)
    chunks = torch.stack([torch.randperm(cap_chunks - 4, generator=g)[:nc] + 4 for _ in range(b * h)]).view(b, h, nc)
    chunks[1, :, :2] = torch.tensor([3, 1])
    chunks[:, :, -1] = chunks[:, :, 0]  # a repeated chunk, marked not fresh
    rpos = torch.arange(rows).expand(slots, -1).clone()
    rpos[0, ::9] = -1
    n = torch.tensor([1000, 600, 200])  # slot 2 stores fewer of its candidates than kc
    fresh = torch.rand(b, h, nc, generator=g) > 0.1
    fresh[:, :, -1] = False
    idx = candidates(chunks, chunk)
    flat = (torch.arange(b * h).view(b, h, 1) * rows + idx).view(-1)
    k_rows = keys.view(-1, d).index_select(0, flat).view(b, h, -1, d)
    s_rows = scales.view(-1).index_select(0, flat).view(b, h, -1)
    want = candidate_top(dot_int8(q, k_rows, s_rows), idx, rpos[:b], n, kc, 0.125,
                         fresh=fresh.repeat_interleave(chunk, dim=-1), ties=True)
    got = cpu_kernels.candidate_top_int8(q, keys, scales, chunks.int(), rpos, n, chunk, kc, 0.125, fresh)
    found = want[1] > float("-inf")
    assert torch.equal(want[1], got[1]) and int(found.sum()) > 0 and not bool(found.all())
    assert torch.equal(want[0][found], got[0][found])
    with pytest.raises(RuntimeError, match="within the reserve"):
        cpu_kernels.candidate_top_int8(q, keys, scales, chunks + cap_chunks, rpos, n, chunk, kc, 0.125, fresh)


@pytest.mark.parametrize("seed", range(3))
def test_chunk_top_int8_equals_torch_with_ties_and_unfilled_chunks(seed, scoring_level):
    """Stage one from int8 bounds: the C++ op's chunks equal the torch code's, best first, ties (few distinct
    bounds here) and unfilled chunks alike."""
    g = torch.Generator().manual_seed(seed)
    slots, b, h, group, d, cap_chunks, chunks, chunk, first = 4, 3, 3, 3, 64, 300, 250, 8, 120
    smin = torch.randint(-3, 1, (slots, h, cap_chunks, d), generator=g, dtype=torch.int8)[:b, :, :chunks]
    smax = torch.randint(0, 4, (slots, h, cap_chunks, d), generator=g, dtype=torch.int8)[:b, :, :chunks]
    sscale = torch.rand(slots, h, cap_chunks, generator=g)[:b, :, :chunks]
    q = torch.randn(b, h, group, d, generator=g)
    n = torch.tensor([chunks * chunk, 700, 0])  # full, 88 chunks filled (fewer than `first`), empty
    want = chunk_top_int8(q, smin, smax, sscale, n, first, chunk, 0.125)
    got = chunk_top_int8(q, smin, smax, sscale, n, first, chunk, 0.125, cpu=True)
    assert want.shape == (b, h, first) and torch.equal(want, got)
    assert set(got[1, 0, :88].tolist()) == set(range(88))  # every filled chunk before any unfilled one


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_two_stage_top_int8_equals_stage_one_then_stage_two(scale_dtype, scoring_level):
    """Both stages in one op: the torch code's stage one over chunks [0, chunks) of the whole bound buffers, its
    chunks written to cand[:b, :, :first] (the rest of cand untouched), then stage two over their tokens; with
    a slot whose filled chunks are fewer than `first` and an empty one."""
    g = torch.Generator().manual_seed(7)
    slots, b, h, group, d, chunk, cap_chunks, chunks, first, kc = 4, 3, 3, 3, 64, 8, 130, 120, 40, 90
    rows = cap_chunks * chunk + 1
    smin = torch.randint(-100, 1, (slots, h, cap_chunks + 1, d), generator=g, dtype=torch.int8)
    smax = torch.randint(0, 100, (slots, h, cap_chunks + 1, d), generator=g, dtype=torch.int8)
    sscale = torch.rand(slots, h, cap_chunks + 1, generator=g)
    keys = torch.randint(-127, 128, (slots, h, rows, d), generator=g, dtype=torch.int8)
    scales = (torch.rand(slots, h, rows, generator=g) / 50).to(scale_dtype)
    q = torch.randn(b, h, group, d, generator=g)
    rpos = torch.arange(rows).expand(slots, -1).clone()
    rpos[0, ::11] = -1  # indices that hold nothing
    n = torch.tensor([chunks * chunk, 20 * chunk + 3, 0])  # full; 21 chunks filled (fewer than first); empty
    cand = torch.full((slots, h, first + 5), -7, dtype=torch.int32)
    part = (slice(0, b), slice(None), slice(0, chunks))
    chosen = chunk_top_int8(q, smin[part], smax[part], sscale[part], n, first, chunk, 0.125)
    idx = candidates(chosen, chunk)
    flat = (torch.arange(b * h).view(b, h, 1) * rows + idx).view(-1)
    k_rows = keys.view(-1, d).index_select(0, flat).view(b, h, -1, d)
    s_rows = scales.view(-1).index_select(0, flat).view(b, h, -1)
    want = candidate_top(dot_int8(q, k_rows, s_rows), idx, rpos[:b], n, kc, 0.125, ties=True)
    got = torch.ops.slam_cpu.two_stage_top_int8(q, smin, smax, sscale, keys, scales, rpos, n, cand, chunks, first,
                                                chunk, kc, 0.125)
    found = want[1] > float("-inf")
    assert torch.equal(want[1], got[1]) and int(found[1].sum()) > 0 and not bool(found[2].any())
    assert torch.equal(want[0][found], got[0][found])
    assert torch.equal(cand[:b, :, :first], chosen.int())
    assert bool((cand[b:] == -7).all()) and bool((cand[:, :, first:] == -7).all())


def test_candidate_top_breaks_ties_by_reserve_index_not_position():
    g = torch.Generator().manual_seed(5)
    b, h, group, m, kc = 2, 3, 3, 512, 60
    dots = bf16_dots(g, b, h, group, m).clamp(-1, 1).mul(3).round()
    idx = torch.stack([torch.randperm(2000, generator=g)[:m] for _ in range(b * h)]).view(b, h, m)
    rpos = torch.arange(2001).expand(b, -1).clone()
    n = torch.tensor([2000, 1500])
    fresh = torch.rand(b, h, m, generator=g) > 0.1
    want = candidate_top(dots, idx, rpos, n, kc, 0.125, fresh=fresh, ties=True)
    got = candidate_top(dots, idx, rpos, n, kc, 0.125, fresh=fresh, ties=True, cpu=True)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_place_equals_torch_place(dtype):
    pool, plan, idx, score, mine = random_pool("cpu", dtype, seed=3, kc=24)
    score, order = score.sort(dim=-1, descending=True)  # place takes the picks best first
    idx = idx.gather(2, order)
    eager, kernel = copy.deepcopy(pool), copy.deepcopy(pool)
    eager.cpu_kernels, kernel.cpu_kernels = False, True
    for layer in range(pool.layers):
        place(eager, layer, plan, idx, score, mine)
        place(kernel, layer, plan, idx, score, mine)
    for layer in range(pool.layers):
        held = (eager.pos[layer][:, :, : pool.budget] >= 0).unsqueeze(-1)  # emptied columns may keep any bytes
        for name in ("pos", "ridx", "k", "v"):
            a, b = getattr(eager, name)[layer][:, :, : pool.budget], getattr(kernel, name)[layer][:, :, : pool.budget]
            if name in ("k", "v"):
                a, b = a * held, b * held
            assert torch.equal(a, b), f"{name}[{layer}]"
    assert torch.equal(eager.replaced, kernel.replaced) and int(kernel.replaced.sum()) > 0


@pytest.mark.parametrize("kernels", [False, True])
@torch.inference_mode()
def test_a_token_chosen_again_keeps_its_column(kernels):
    """Placement moves only what changed: a token the middle held and the query chose again stays in its
    column with its row, the newcomers (counted as churn) take the columns of tokens that left, and the
    columns hold exactly the chosen tokens afterwards."""
    pool, plan, idx, score, mine = random_pool("cpu", torch.float32, seed=4, kc=24)
    score, order = score.sort(dim=-1, descending=True)
    idx = idx.gather(2, order)
    pool.cpu_kernels = kernels
    before = copy.deepcopy(pool)
    place(pool, 0, plan, idx, score, mine)
    take = torch.where(mine, plan.middle, 0)
    moved = 0
    for s in range(idx.shape[0]):
        cols = slice(int(plan.sink[s]), int(plan.sink[s]) + int(take[s]))
        for h in range(pool.kv_heads):
            old, new = before.ridx[0][s, h, cols], pool.ridx[0][s, h, cols]
            n = int(take[s])
            chosen = set(idx[s, h, :n][score[s, h, :n] > float("-inf")].tolist())
            assert set(new[new >= 0].tolist()) == chosen
            again = torch.tensor([t in chosen for t in old.tolist()], dtype=torch.bool) & (old >= 0)
            assert torch.equal(new[again], old[again])
            assert torch.equal(pool.k[0][s, h, cols][again], before.k[0][s, h, cols][again])
            moved += int(((new != old) & (new >= 0)).sum())
    assert moved == int(pool.replaced.sum()) > 0


@pytest.mark.parametrize(("dtype", "min_ratio", "every"), [("int8", 4, 1), ("float32", 4, 1), ("int8", 1, 2), ("float32", 1, 4)])
def test_engine_with_kernels_decodes_like_the_torch_code(dtype, min_ratio, every):
    """Tokens and churn of slam requests of different lengths, with the ops and without, over many steps:
    exact selection, and two stages (min ratio 1) refreshing every other step with re-ranking between."""
    loaded = random_model(dict(SHAPES["smollm2-135m"], num_hidden_layers=4), dtype, "cpu")
    runs = []
    for kernels in (True, False):
        cache = CacheConfig(policy="slam", budget=128, sink=4, recent=32)
        # Oversampling 8 at every r: with r = 4's default of 16 two stages would not start on this reserve.
        engine = LLMEngine(EngineConfig(max_batch=4, cache=cache, dtype=dtype, max_model_len=1400, select_oversample=8,
                                        select_min_ratio=min_ratio, select_every=every), loaded)
        assert engine.runner.pool.cpu_kernels  # built and on by default
        engine.runner.pool.cpu_kernels = kernels
        seqs = [synthetic_request(engine, 600 + 250 * i, SamplingParams(max_tokens=40, ignore_eos=True), seed=i)
                for i in range(3)]
        churn = []  # per step: a finished request's slot forgets its count
        for _ in range(30):
            engine.step()
            churn.append(engine.runner.pool.replaced[:3].tolist())
        assert engine.runner.pool.two_stage == (min_ratio == 1)
        runs.append(([s.output_ids for s in seqs], churn, [layer.clone() for layer in engine.runner.pool.ridx]))
    assert runs[0][:2] == runs[1][:2] and min(runs[0][1][-1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))  # the same tokens in the same columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reserve_append_equals_reserve_write(dtype):
    """One evicted token per slot into the reserve, with its int8 scoring copy: the C++ op writes exactly
    what pool.reserve_write writes (keys of very different magnitudes, scratch index included)."""
    g = torch.Generator().manual_seed(2)
    slots, h, rows, d = 5, 3, 50, 64
    base = {name: torch.randn(slots, h, rows, d, generator=g).to(dtype) for name in ("rk", "rv")}
    base["rq"] = torch.randint(-127, 128, (slots, h, rows, d), generator=g, dtype=torch.int8)
    base["rq_scale"] = torch.rand(slots, h, rows, generator=g).to(torch.bfloat16)
    at = torch.tensor([0, 17, 49, 3])  # 49: the scratch index
    k = (torch.randn(4, h, d, generator=g) * torch.logspace(-6, 3, 4).view(4, 1, 1)).to(dtype)
    v = torch.randn(4, h, d, generator=g).to(dtype)
    want = {name: t.clone() for name, t in base.items()}
    part = (torch.arange(4), slice(None), at)
    want["rk"][part], want["rv"][part] = k, v
    want["rq"][part], want["rq_scale"][part] = quantize_rows(k, torch.bfloat16)
    got = {name: t.clone() for name, t in base.items()}
    torch.ops.slam_cpu.reserve_append(got["rk"], got["rv"], got["rq"], got["rq_scale"], at, k, v)
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name


def test_summarize_append_equals_the_bounds_code():
    """Folding new keys into int8 chunk bounds, step by step over several chunks, with keys that grow (the
    scale grows: requantized outward), shrink (kept) and start chunks: the C++ op's bounds equal the torch
    code's at every step."""
    g = torch.Generator().manual_seed(4)
    slots, h, d, chunk, chunks = 3, 3, 64, 8, 6

    class Bounds(ChunkBounds):
        def __init__(self):
            self.chunk, self.kv_heads, self.head_dim, self.cpu_kernels = chunk, h, d, False
            self.smin = [torch.zeros(slots, h, chunks, d, dtype=torch.int8)]
            self.smax = [torch.zeros(slots, h, chunks, d, dtype=torch.int8)]
            self.sscale = [torch.zeros(slots, h, chunks)]

    torch_side, kernel = Bounds(), Bounds()
    for step in range(3 * chunk + 3):
        at = torch.tensor([step, step + 5, chunks * chunk - 1])  # the last slot keeps writing one scratch chunk
        keys = torch.randn(slots, h, d, generator=g) * float(torch.rand(1, generator=g) * 4 + 0.1)
        ChunkBounds.summarize_append(torch_side, 0, at, keys)
        torch.ops.slam_cpu.summarize_append(kernel.smin[0], kernel.smax[0], kernel.sscale[0], at, keys, chunk,
                                            bounds.OUTWARD / 127)
        for name in ("smin", "smax", "sscale"):
            assert torch.equal(getattr(torch_side, name)[0], getattr(kernel, name)[0]), (name, step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_write_equals_the_indexing(dtype):
    """engine/ring.py on a CPU (the C++ op) trades each slot's ring column like model_runner's indexing: what
    it returns and every pool tensor after, with an idle slot writing its scratch column."""
    with torch.inference_mode():
        for seed in range(2):
            compare_ring("cpu", dtype, seed)


def test_a_compiler_without_openmp_still_builds_the_ops(monkeypatch):
    """The build asks for OpenMP first and, where the compiler refuses it, builds the ops without it."""
    from torch.utils import cpp_extension

    calls = []

    def load(name, sources, extra_cflags, extra_ldflags, is_python_module):
        calls.append(extra_cflags)
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")

    monkeypatch.setattr(cpp_extension, "load", load)
    assert cpu_kernels._build()
    assert calls == [["-O3", "-fopenmp"], ["-O3"]]


@pytest.mark.parametrize(("n", "k"), [(960, 576), (7, 40), (5, 1536), (4, 17)])
def test_int8_linear_rows_do_not_depend_on_the_batch_or_the_kernel(n, k, scoring_level):
    """The int8 weights' decode product: close to the exact product, and each row's bits the same alone or in any
    batch, on every vector path (the same order of sums; row and column tails off the vector width included)."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) / 127
    x = torch.randn(9, k, generator=g)
    y = cpu_kernels.int8_linear(x, w, scale)
    exact = (x.double() @ w.double().T) * scale.double()
    assert y.dtype == torch.float32 and torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max())
    alone = torch.cat([cpu_kernels.int8_linear(x[i : i + 1], w, scale) for i in range(9)])
    assert torch.equal(alone, y)
    assert torch.equal(cpu_kernels.int8_linear(x[2:6], w, scale), y[2:6])
    best = cpu_kernels.scoring_level()
    try:
        cpu_kernels.scoring_level("default")  # the scalar loop: the reference order of every path
        assert torch.equal(cpu_kernels.int8_linear(x, w, scale), y)
    finally:
        cpu_kernels.scoring_level(best)


@pytest.mark.parametrize(("dtype", "d"), [(torch.bfloat16, 64), (torch.float32, 64), (torch.bfloat16, 128), (torch.bfloat16, 40)])
def test_decode_attention_equals_sdpa_and_its_rows_do_not_depend_on_the_batch(dtype, d, scoring_level):
    """Decode attention over the pool (cpu_attention.cpp): the masked softmax-weighted sum of SDPA, columns outside
    the mask never read (NaN there changes nothing), and each row's bits the same alone, batched and on every
    vector path."""
    g = torch.Generator().manual_seed(d)
    b, h, group, c, scale = 5, 3, 3, 37, 0.17
    q = torch.randn(b, h * group, 1, d, generator=g)
    k, v = (torch.randn(b, h, c, d, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(b, h, 1, c, generator=g) > 0.3
    valid[..., 0] = True
    valid[1] = False
    valid[1, :, :, 5] = True  # one column to attend
    out = cpu_kernels.decode_attend(q, k, v, valid, scale)
    mask = valid.repeat_interleave(group, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                            scale=scale, enable_gqa=True)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], v[1, :, 5:6].float().repeat_interleave(group, dim=0))
    hidden = ~valid.squeeze(2)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[hidden], v_nan[hidden] = float("nan"), float("nan")
    assert torch.equal(cpu_kernels.decode_attend(q, k_nan, v_nan, valid, scale), out)
    alone = torch.cat([cpu_kernels.decode_attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], valid[i : i + 1], scale)
                       for i in range(b)])
    assert torch.equal(alone, out)
    assert torch.equal(cpu_kernels.decode_attend(q.to(dtype), k, v, valid, scale),
                       cpu_kernels.decode_attend(q.to(dtype).float(), k, v, valid, scale))
    best = cpu_kernels.scoring_level()
    try:
        cpu_kernels.scoring_level("default")  # the scalar loop: the reference order of every path
        assert torch.equal(cpu_kernels.decode_attend(q, k, v, valid, scale), out)
    finally:
        cpu_kernels.scoring_level(best)
