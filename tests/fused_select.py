"""The decode step's selection and attention kernels against the eager code they replace (tests/fused_check.py
runs them): the top-k kernels (cache/fused_top.py), stage two in place and with_latest (cache/fused_dots.py),
stage one over int8 bounds, and decode attention over the pool (engine/decode_attention.py).
"""

from __future__ import annotations

import torch

from slam.cache import fused_dots, fused_top
from slam.cache.selection import (bound_scores, candidate_stored, candidates, chunk_top_in_place, dequantize_bounds,
                                  dot_float, exact_top, group_scores, select_reserve, upper_bound, with_latest)
from slam.engine import decode_attention
from slam.engine.attention import attend
from slam.engine.pool import SlotPool
from tests.fused_writes import fill_reserve


@torch.inference_mode()
def compare_latest(device: str, seed: int = 0) -> None:
    """fused_dots.with_latest against selection.with_latest, equal entries and flags: distinct chunks in any
    order, a row of zeros (a slot cleared before its first refresh), latest chunks among the chosen ones,
    and reserves shorter than the latest chunks."""
    g = torch.Generator().manual_seed(seed)
    b, heads, first, chunk = 4, 3, 37, 8
    cand = torch.stack([torch.randperm(60, generator=g)[:first] for _ in range(b * heads)]).view(b, heads, first)
    cand[1] = 0
    cand[2, :, :3] = torch.tensor([59, 58, 57])  # the latest chunks of slot 2, chosen already in some heads
    buf = torch.zeros(b + 1, heads, first + 5, dtype=torch.int32)
    buf[:b, :, :first] = cand
    n = torch.tensor([480, 3, 480, 9], device=device)  # slot 2's last token lies in chunk 59
    for latest in (1, 2, 3):
        view = buf.to(device)[:b, :, :first]
        got = fused_dots.with_latest(view, n, chunk, latest)
        want = with_latest(view.long(), n, chunk, latest)
        for name, x, y in zip(("chunks", "fresh"), got, want):
            assert torch.equal(x, y), f"{name} differs (latest {latest}) at {(x != y).nonzero()[:5].tolist()}"


@torch.inference_mode()
def compare_top(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, kc: int = 24, m: int = 300,
                group: int = 3) -> None:
    """cache/fused_top.py's kernel against group_scores + torch.topk (selection.exact_top): the same picks
    where the scores are apart, the same scores, and a reserve with holes, part-filled slots and a slot
    holding fewer tokens than kc."""
    g = torch.Generator().manual_seed(seed)
    b, heads, d = 4, 2, 16
    q = torch.randn(b, heads, group, d, generator=g).to(device, dtype)
    keys = torch.randn(b, heads, m, d, generator=g).to(device, dtype)
    rpos = torch.arange(m + 1).repeat(b, 1)
    rpos[1, 5:40] = -1  # tokens not stored (holes)
    rpos[:, m] = -1
    n = torch.tensor([m, m - 7, kc // 2, m // 2])  # slot 2 holds fewer than kc
    rpos, n, scale = rpos.to(device), n.to(device), d**-0.5
    want_idx, want = exact_top(dot_float(q, keys), rpos[:, :m], n, kc, scale)
    idx, score = fused_top.group_top(dot_float(q, keys), rpos, n, kc, scale)
    found = score > float("-inf")
    assert torch.equal(found.sum(-1), (want > float("-inf")).sum(-1)), "different numbers of picks found"
    # Each found pick is one of the kc best up to rounding (the two compute the log-softmax differently).
    eager = torch.full((b, heads, m), float("-inf"), device=device).scatter(2, want_idx, want)
    kth = want.min(dim=-1, keepdim=True).values
    assert bool(((eager.gather(2, idx) >= kth - 1e-4) | ~found).all()), "a pick outside the kc best"
    assert torch.allclose(torch.where(found, eager.gather(2, idx), 0), torch.where(found, score, 0), atol=1e-4)
    assert all(len(set(row)) == kc for row in idx.flatten(0, 1).tolist()), "a pick taken twice"
    if m > fused_top.SPAN_LIMIT:  # long rows' picks come best first, the one-program kernel's in reserve order
        assert bool((score[..., 1:] <= score[..., :-1]).all()), "picks not best first"
    else:
        assert bool((idx.diff(dim=-1) > 0).all()), "picks not in reserve order"
    limit = torch.tensor([kc, kc // 2, 1, kc - 3], device=device)
    lidx, lscore = fused_top.group_top(dot_float(q, keys), rpos, n, kc, scale, limit)
    for s in range(b):  # each slot's best `limit` first, then empty picks
        k = int(limit[s])
        assert bool((lscore[s, :, k:] == float("-inf")).all()) and bool((lidx[s, :, k:] == 0).all()), "past the limit"
        best = want[s].sort(dim=-1, descending=True).values[:, :k]
        assert torch.allclose(lscore[s, :, :k].sort(dim=-1, descending=True).values, best, atol=1e-4), "not the best"


@torch.inference_mode()
def compare_limit(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, kc: int = 300, m: int = 9000) -> None:
    """fused_top.stored_top with a per-slot limit: each slot's first `limit` picks are its `limit` best (in
    column order, unsorted), the rest of its kc are empty. Ties go to lower columns: a slot storing fewer
    tokens than its limit gets them all, then its first unstored columns; equal scores, the first columns."""
    g = torch.Generator().manual_seed(seed)
    b, heads, group, d = 4, 2, 3, 16
    q = torch.randn(b, heads, group, d, generator=g).to(device, dtype)
    keys = torch.randn(b, heads, m, d, generator=g)
    keys[3, 0] = keys[3, 0, :1]  # slot 3, head 0: every score equal
    keys = keys.to(device, dtype)
    stored = torch.ones(b, 1, m, dtype=torch.bool)
    stored[1, :, 100:700] = False
    few = torch.randperm(m, generator=g)[: kc // 3]
    stored[0] = False
    stored[0, :, few] = True  # slot 0 stores fewer tokens than its limit
    limit = torch.tensor([kc, kc // 2, 1, kc - 7])
    stored, limit, scale = stored.to(device), limit.to(device), d**-0.5
    logits = dot_float(q, keys)
    idx, score = fused_top.stored_top(logits, stored, kc, scale, limit)
    want = group_scores(q, keys, stored, scale)  # [b, heads, m]
    for s in range(b):
        k = int(limit[s])
        assert bool((score[s, :, k:] == float("-inf")).all()), "picks past the limit"
        assert bool((idx[s, :, k:] == 0).all()), "empty picks not zeroed"
        best = want[s].topk(k, dim=-1).values
        assert torch.allclose(score[s, :, :k].sort(-1, descending=True).values, best, atol=1e-4), "not the best"
        assert torch.allclose(want[s].gather(-1, idx[s, :, :k]), score[s, :, :k], atol=1e-4), "scores of other picks"
        assert bool((idx[s, :, :k].diff(dim=-1) > 0).all()), "picks not in column order"
    held = stored[0, 0].nonzero().view(-1)
    unstored = (~stored[0, 0]).nonzero().view(-1)
    expect = torch.cat([held, unstored[: kc - held.numel()]]).sort().values
    assert torch.equal(idx[0, 0], expect) and torch.equal(idx[0, 1], expect), "stored tokens, then the first unstored"
    assert torch.equal(idx[3, 0, : kc - 7], torch.arange(kc - 7, device=idx.device)), "equal scores: not the first columns"


@torch.inference_mode()
def compare_dots(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, chunk: int = 8, c: int = 37,
                 int8: bool = False) -> None:
    """cache/fused_dots.py's in-place stage two against gathering the candidates and dot_float, with
    chunks in any order, repeated chunks and the last chunk of the reserve, and its stored flags against
    candidate_stored (holes, part-filled and empty slots, repeats); and its exact scoring of a
    reserve's first tokens. Keys past a slot's n are not read: their products are 0. int8: keys with a
    float32 scale per token, against their dequantized keys."""
    g = torch.Generator().manual_seed(seed)
    slots, b, heads, group, d, chunks = 5, 4, 2, 3, 16, 50
    shape = (slots, heads, chunks * chunk + 1, d)
    q = torch.randn(b, heads, group, d, generator=g).to(device, dtype)
    if int8:
        keys = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(device)
        scales = (torch.rand(shape[:3], generator=g) * 0.02 + 0.01).to(device)
        plain, qq = keys.float() * scales.unsqueeze(-1), q.float()  # float32: the kernel's exact products
    else:
        keys = plain = torch.randn(shape, generator=g).to(device, dtype)
        scales, qq = None, q
    chosen = torch.randint(0, chunks, (b, heads, c), generator=g)
    chosen[0, 0, :3] = chunks - 1
    idx = candidates(chosen, chunk).to(device)
    rpos = torch.arange(shape[2]).expand(slots, -1).clone()
    rpos[1, 30:70] = -1  # positions not stored (holes)
    n = torch.tensor([chunks * chunk, chunks * chunk - 13, 5 * chunk + 3, 0])
    fresh = torch.rand(b, heads, c, generator=g) > 0.2
    rpos, n, fresh = rpos.to(device), n.to(device), fresh.to(device)
    want = dot_float(qq, plain[:b].gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d)))
    want = want.masked_fill((idx >= n.view(-1, 1, 1)).unsqueeze(2), 0.0)  # keys past a slot's n are not read
    want_stored = candidate_stored(idx, rpos[:b], n, fresh.repeat_interleave(chunk, dim=-1))
    got, stored = fused_dots.chunk_dots_stored(q, keys, chosen.to(device), chunk, scales, rpos, n, fresh)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()
    assert torch.equal(stored, want_stored) and bool(stored.any()) and not bool(stored.all()), "stored flags"
    assert torch.equal(fused_dots.chunk_dots_stored(q, keys, chosen.to(device), chunk, scales, rpos, n, None)[1],
                       candidate_stored(idx, rpos[:b], n, None)), "stored flags without fresh"
    span = chunks * chunk - 5
    want = dot_float(qq, plain[:b, :, :span]).masked_fill(torch.arange(span, device=device) >= n.view(-1, 1, 1, 1), 0.0)
    got = fused_dots.reserve_dots(q, keys, scales, span, n)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()
    assert bool((want[1, :, :, int(n[1]) - 8 : int(n[1])] != 0).all()) and bool((got[2, :, :, int(n[2]):] == 0).all())


@torch.inference_mode()
def compare_chunk_top(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, chunks: int = 300,
                      first: int = 40) -> None:
    """Stage one on GPUs (selection.chunk_top_in_place: int8 bounds read in place, the long-row top-k) against
    bound_scores of the bounds dequantized in float32 (the eager chunk_top rounds them to q's dtype first): the
    same chunks where their bounds are apart, over views of larger buffers; a slot with fewer filled chunks than
    `first` gets them all, then distinct empty ones."""
    g = torch.Generator().manual_seed(seed)
    slots, b, heads, group, d, chunk = 5, 3, 2, 3, 16, 8
    shape = (slots, heads, chunks + 9, d)
    smin = torch.randint(-127, 1, shape, generator=g, dtype=torch.int8).to(device)
    smax = torch.randint(0, 128, shape, generator=g, dtype=torch.int8).to(device)
    sscale = (torch.rand(shape[:3], generator=g) * 0.02 + 0.01).to(device)
    q = torch.randn(b, heads, group, d, generator=g).to(device, dtype)
    n = torch.tensor([chunks * chunk, chunks * chunk - 13, 11 * chunk + 2], device=device)  # 12 filled < first
    got = chunk_top_in_place(q, smin, smax, sscale, n, chunks, first, chunk, d**-0.5)
    part = (slice(0, b), slice(None), slice(0, chunks))
    lo, hi = dequantize_bounds(smin[part], smax[part], sscale[part], torch.float32)
    filled = (torch.arange(chunks, device=device) * chunk < n.view(-1, 1)).unsqueeze(1)
    scores = bound_scores(q.float(), lo, hi, filled, d**-0.5)  # [b, heads, chunks]
    top = scores.topk(first, dim=-1)
    assert got.shape == top.indices.shape == (b, heads, first)
    for row, want_row, s, k in zip(got.flatten(0, 1).tolist(), top.indices.flatten(0, 1).tolist(),
                                   scores.flatten(0, 1).tolist(), top.values[..., -1].flatten().tolist()):
        assert len(set(row)) == first, "a chunk picked twice"
        clear = {c for c in range(chunks) if s[c] > float("-inf") and abs(s[c] - k) > 1e-3}  # apart from the cut
        assert {c for c in row if c in clear} == {c for c in want_row if c in clear}, "different chunks"
    assert set(got[2, 0].tolist()) >= set(range(12)), "a filled chunk left out"
    # The bounds themselves, in one pass over both halves: chunks past a slot's tokens are not read (0).
    upper = fused_dots.bound_dots(q, smin, smax, sscale, chunks, chunk, n)
    want = upper_bound(q.float(), lo, hi).masked_fill(~filled.unsqueeze(2), 0.0)
    assert torch.allclose(upper, want, rtol=1e-4, atol=1e-4), (upper - want).abs().max()
    assert bool((upper[2, :, :, 12:] == 0).all()) and bool((upper[2, :, :, :12] != 0).all())


@torch.inference_mode()
def compare_int8_selection(device: str, seed: int = 0, kc: int = 24) -> None:
    """An int8 reserve scored in place (pool.fused: exact scoring, then two stages at a refresh and between
    refreshes) against the eager path, which dequantizes the keys first: the same scores and the same picks
    where the scores are apart. float32, where dequantizing rounds little."""
    g = torch.Generator().manual_seed(seed)
    slots, heads, d, chunk, b = 5, 2, 16, 8, 4
    for min_ratio in (10**6, 1):  # exact scoring, then two stages
        pool = SlotPool(1, slots, heads, kc + 16, d, torch.float32, torch.device(device), reserve_int8=True,
                        chunk=chunk, oversample=4, min_ratio=min_ratio)
        pool.ensure_reserve(5 * (kc + 16))
        assert pool.two_stage == (min_ratio == 1)
        fill_reserve(pool, 0, g)
        pool.rpos[:, : pool.cap] = torch.arange(pool.cap) + 4
        pool.rpos[1, 30:70] = -1
        n = torch.tensor([pool.cap, pool.cap - 13, pool.cap // 2, 3 * kc], device=device)
        if pool.two_stage:
            for slot in range(b):
                pool.summarize(0, slot, 0, int(n[slot]))
        q = torch.randn(b, heads, 3, d, generator=g).to(device)
        for refresh in (True, False) if pool.two_stage else (True,):
            pool.fused = False
            want_idx, want = select_reserve(pool, 0, q, n, kc, refresh=refresh)
            pool.fused = True
            idx, score = select_reserve(pool, 0, q, n, kc, refresh=refresh)
            same_picks(idx, score, want_idx, want)


def same_picks(idx: torch.Tensor, score: torch.Tensor, want_idx: torch.Tensor, want: torch.Tensor) -> None:
    """Two selections [b, heads, kc] agree: as many picks found, the same scores, the same picks where the
    scores are apart (either may come in any order)."""
    found = score > float("-inf")
    assert torch.equal(found.sum(-1), (want > float("-inf")).sum(-1)), "different numbers of picks found"
    assert torch.allclose(score.sort(-1).values, want.sort(-1).values, atol=1e-4), "different scores"
    kth = want.min(dim=-1, keepdim=True).values + 1e-4
    for row, want_row, s, w in zip(idx.flatten(0, 1).tolist(), want_idx.flatten(0, 1).tolist(),
                                   (score > kth).flatten(0, 1).tolist(), (want > kth).flatten(0, 1).tolist()):
        assert {i for i, x in zip(row, s) if x} == {i for i, x in zip(want_row, w) if x}, "different picks"


@torch.inference_mode()
def compare_two_stage(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, kc: int = 24) -> None:
    """Two-stage selection (selection.select_reserve) with the in-place kernels (pool.fused) against the
    gathering path, at a refresh and between refreshes: the same picks where the scores are apart and the
    same scores, with holes in the reserve and part-filled slots."""
    g = torch.Generator().manual_seed(seed)
    slots, heads, d, chunk, b = 5, 2, 16, 8, 4
    pool = SlotPool(1, slots, heads, kc + 16, d, dtype, torch.device(device), chunk=chunk, oversample=4, min_ratio=1)
    pool.ensure_reserve(5 * (kc + 16))  # min_ratio x oversample x budget, and more
    assert pool.two_stage, "two stages did not start"
    pool.rk[0].copy_(torch.randn(pool.rk[0].shape, generator=g).to(dtype))
    pool.rpos[:, : pool.cap] = torch.arange(pool.cap) + 4
    pool.rpos[1, 30:70] = -1  # tokens not stored (holes)
    n = torch.tensor([pool.cap, pool.cap - 13, pool.cap // 2, 3 * kc], device=device)
    for slot in range(b):
        pool.summarize(0, slot, 0, int(n[slot]))
    q = torch.randn(b, heads, 3, d, generator=g).to(device, dtype)
    whole = torch.full((b,), kc, device=device)  # a limit of kc: the same picks, unsorted
    for refresh, limit in ((True, None), (False, None), (True, whole)):
        pool.fused = False
        want_idx, want = select_reserve(pool, 0, q, n, kc, refresh=refresh)
        pool.fused = True
        idx, score = select_reserve(pool, 0, q, n, kc, refresh=refresh, limit=limit)
        same_picks(idx, score, want_idx, want)


@torch.inference_mode()
def compare_attention(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, cols: int = 300,
                      group: int = 3) -> None:
    """engine/decode_attention.py against SDPA (attention.attend): a slot attending to its scratch column
    only, one with holes, whole blocks without a valid column."""
    g = torch.Generator().manual_seed(seed)
    b, heads, d = 4, 2, 16
    q = torch.randn(b, heads * group, 1, d, generator=g).to(device, dtype)
    k, v = (torch.randn(b, heads, cols, d, generator=g).to(device, dtype) for _ in range(2))
    valid = torch.rand(b, heads, 1, cols, generator=g) < 0.7
    valid[0] = False
    valid[0, :, :, cols - 1] = True  # an idle slot: its scratch column
    valid[2, :, :, : cols // 2] = False
    valid = valid.to(device)
    want = attend(q, k, v, valid, d**-0.5)
    got = decode_attention.attend(q, k, v, valid, d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol), (got.float() - want.float()).abs().max()


@torch.inference_mode()
def compare_ties(device: str, seed: int = 0, m: int = 3000, kc: int = 700, group: int = 3) -> None:
    """The one-program kernel's picks where scores tie in large groups (logits of a few levels only) and where
    fewer than the limit are stored: exactly each row's `limit` best with ties to lower columns, as
    top_by_index orders them, from stored flags and from reserve positions. The bisection's early stop must
    give the picks of the full search."""
    g = torch.Generator().manual_seed(seed)
    b, heads = 4, 2
    logits = torch.randint(0, 5, (b, heads, group, m), generator=g).float().to(device)
    rpos = torch.arange(m + 1).repeat(b, 1)
    rpos[torch.rand(b, m + 1, generator=g) < 0.3] = -1
    rpos[3, kc // 3 :] = -1  # slot 3 stores fewer tokens than its limit
    rpos[:, m] = -1
    n = torch.tensor([m, m - 11, m // 2, m])
    limit = torch.tensor([kc, kc // 2, kc, kc - 1])
    rpos, n, limit = rpos.to(device), n.to(device), limit.to(device)
    stored = ((torch.arange(m, device=device) < n.view(-1, 1)) & (rpos[:, :m] >= 0)).unsqueeze(1)
    scores = group_scores_from_logits(logits, stored)
    for how, (idx, score) in (("positions", fused_top.group_top(logits, rpos, n, kc, 1.0, limit)),
                              ("flags", fused_top.stored_top(logits, stored, kc, 1.0, limit))):
        for s in range(b):
            k = int(limit[s])
            for h in range(heads):
                row = scores[s, h]
                want = sorted(range(m), key=lambda c: (-row[c].item(), c))[:k]
                want = sorted(c for c in want if row[c] > float("-inf"))
                got = sorted(c for c, x in zip(idx[s, h, :k].tolist(), score[s, h, :k].tolist()) if x > float("-inf"))
                assert got == want, f"{how}: slot {s} head {h} picks differ"


def group_scores_from_logits(logits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """selection.group_log_probs on the CPU in float64: exact ties stay ties, levels stay apart."""
    x = logits.double().cpu().masked_fill(~stored.cpu().unsqueeze(2), float("-inf"))
    best = torch.log_softmax(x, dim=-1).amax(dim=2)
    return torch.where(stored.cpu(), best, float("-inf"))
