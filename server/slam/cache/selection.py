"""Scoring the reserve by the current query: exactly, or in two stages through chunk bounds.

Both stages rank by the attention a token (or the best token a chunk could hold) would receive: a softmax
of q.k over the candidates, maximised over the KV head's query group, so the two agree when the first
stage keeps every chunk. Scores are log-probabilities: probabilities underflow to exactly 0 for most of a
long reserve, and top-k among equal zeros picks arbitrarily (differently from run to run on a GPU).
"""

from __future__ import annotations

import torch

from slam.cache import cpu_kernels, fused_dots, fused_top
from slam.compiled import compiled


def group_scores(q: torch.Tensor, keys: torch.Tensor, stored: torch.Tensor, scale: float) -> torch.Tensor:
    """Log of the attention each query would pay each key, max over the group (and queries), -inf where not
    stored.

    q: [b, kv_heads, queries, head_dim]; keys: [b, kv_heads, m, head_dim]; stored: [b, 1 or kv_heads, m]
    -> [b, kv_heads, m].
    """
    return group_log_probs(dot_float(q, keys) * scale, stored)


def group_log_probs(logits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Scaled q.k logits [b, kv_heads, queries, m] -> group_scores' [b, kv_heads, m]."""
    scores = log_probs(logits, stored).amax(dim=2)  # NaN where nothing is stored
    return torch.where(stored, scores, float("-inf"))


def log_probs(logits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Each query's log-softmax over the stored keys: [b, kv_heads, queries, m], -inf where not stored."""
    return torch.log_softmax(logits.masked_fill(~stored.unsqueeze(2), float("-inf")), dim=-1)


def dot_float(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q @ keys^T in float32: [b, h, queries, d] x [b, h, m, d] -> [b, h, queries, m]. On GPUs, half-precision
    inputs accumulate into float32 outputs directly; rounded to bfloat16 first, many scores would tie."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        b, h = q.shape[:2]
        out = torch.bmm(q.flatten(0, 1), keys.flatten(0, 1).transpose(-1, -2), out_dtype=torch.float32)
        return out.view(b, h, *out.shape[1:])
    return (q @ keys.transpose(-1, -2)).float()


def quantize_query(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [..., d] -> (its int16 rounding, held in float64, and float32 scales [..., 1]): max |q| / 32767 per
    row (at least 1e-30), q / scale rounded half to even. cpu_scores.cpp's quantize_query, bit for bit."""
    qf = q.float()
    qs = qf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 32767
    return torch.round(qf / qs).double(), qs


def dot_int8(q: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q @ keys^T from int8 keys with one scale per key (CPUs): exact scoring there is bound by the key bytes it
    reads, a quarter of float32's. The query is rounded to int16 (quantize_query) and the products summed
    exactly (in float64 here, in int32 by the C++ ops, which give the same values), then scaled:
    float(dot) * (query scale * key scale). A slot scores alike in any batch.

    q: [b, h, queries, d]; keys: [b, h, m, d] int8; scales: [b, h, m] -> [b, h, queries, m] float32."""
    q16, qs = quantize_query(q)
    dots = (q16 @ keys.double().transpose(-1, -2)).float()
    return dots * (qs * scales.float().unsqueeze(-2))


def bound_scores(q: torch.Tensor, smin: torch.Tensor, smax: torch.Tensor, stored: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Quest's upper bound of q.k over each chunk, softmaxed and maximised like group_scores.

    q: [b, kv_heads, queries, head_dim]; smin, smax: [b, kv_heads, chunks, head_dim] element-wise bounds of
    the chunk's keys; stored: [b, 1, chunks] -> [b, kv_heads, chunks].
    """
    logits = upper_bound(q, smin, smax).float().masked_fill(~stored.unsqueeze(2), float("-inf")) * scale
    scores = torch.log_softmax(logits, dim=-1).amax(dim=2)
    return torch.where(stored, scores, float("-inf"))


def upper_bound(q: torch.Tensor, smin: torch.Tensor, smax: torch.Tensor) -> torch.Tensor:
    """The largest q.k any key inside the element-wise bounds can reach -> [b, kv_heads, queries, chunks]."""
    # Per dimension the best corner of the box: smax where q is positive, smin where it is negative.
    return q.clamp_min(0) @ smax.transpose(-1, -2) + q.clamp_max(0) @ smin.transpose(-1, -2)


def candidates(chunks: torch.Tensor, chunk: int) -> torch.Tensor:
    """Reserve indices of the tokens of `chunks` [b, kv_heads, c] -> [b, kv_heads, c * chunk]."""
    offsets = torch.arange(chunk, device=chunks.device)
    return (chunks.unsqueeze(-1) * chunk + offsets).flatten(-2)


def exact_top(dots: torch.Tensor, rpos: torch.Tensor, n: torch.Tensor, kc: int,
              scale: float, ties: bool = False, cpu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact selection: the `kc` best of reserve indices [0, m) by their q.k `dots` [b, kv_heads, group, m]
    (dot_float or dot_int8); rpos: [b, m]; n: [b] tokens stored -> (indices, scores) [b, kv_heads, kc], best
    first. `ties`: break ties toward lower indices.
    `cpu`: the group's maximum and top-k in one C++ op (cache/cpu_kernels.py), which breaks ties so too."""
    index = torch.arange(dots.shape[3], device=dots.device)
    stored = ((index < n.view(-1, 1)) & (rpos >= 0)).unsqueeze(1)
    if cpu:
        return cpu_kernels.group_top(log_probs(dots * scale, stored), stored, kc)
    return top_by_index(group_log_probs(dots * scale, stored), index if ties else None, kc)


def top_by_index(scores: torch.Tensor, index: torch.Tensor | None, kc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk (best first) of scores [b, kv_heads, m] whose equal scores rank by reserve `index` (broadcast to
    scores), lower first -> (positions in m, scores); index None: torch.topk's own order among ties.
    Low-precision dots tie often, and torch.topk breaks ties by where they sit, which would make a slot's picks
    depend on how long the array is (on the rest of its batch). A relative nudge below float32's resolution and above
    float64's orders ties without reordering scores (and an absolute one far below float32's smallest,
    scores of exactly 0: one key taking all of a query's attention, twice)."""
    if index is None:
        top = scores.topk(kc, dim=-1)
        return top.indices, top.values
    key = scores.double()
    key = key - (key.abs() + 2.0**-1000) * (index.double() + 1) * 2.0**-48
    top = key.topk(kc, dim=-1)
    return top.indices, scores.gather(-1, top.indices)


def dequantize_bounds(smin: torch.Tensor, smax: torch.Tensor, sscale: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 bounds [..., chunks, head_dim] with their scales [..., chunks] (engine/bounds.py) -> float bounds."""
    s = sscale.unsqueeze(-1)
    return (smin * s).to(dtype), (smax * s).to(dtype)


def filled_chunks(chunks: int, chunk: int, n: torch.Tensor) -> torch.Tensor:
    """Which of chunks [0, chunks) hold a stored token, given n [b] tokens stored -> [b, 1, chunks]."""
    return (torch.arange(chunks, device=n.device) * chunk < n.view(-1, 1)).unsqueeze(1)


def chunk_top(q: torch.Tensor, smin: torch.Tensor, smax: torch.Tensor, sscale: torch.Tensor, n: torch.Tensor,
              first: int, chunk: int, scale: float, best_first: bool = False) -> torch.Tensor:
    """Stage one: the `first` chunks of highest bound -> chunk indices [b, kv_heads, first], unordered unless
    `best_first` (the order only breaks exact ties in stage two).

    smin, smax: [b, kv_heads, chunks, head_dim] int8 bounds, sscale [b, kv_heads, chunks] their scales
    (engine/bounds.py); n: [b] tokens stored."""
    # In float32: bounds rounded to a bfloat16 query's dtype moved chunks across the cut, and chunk_top_in_place
    # (GPUs) multiplies the exact int8 bounds with float32 sums.
    smin, smax = dequantize_bounds(smin, smax, sscale, torch.float32)
    scores = bound_scores(q.float(), smin, smax, filled_chunks(smin.shape[2], chunk, n), scale)
    return scores.topk(first, dim=-1, sorted=best_first).indices


def chunk_top_in_place(q: torch.Tensor, smin: torch.Tensor, smax: torch.Tensor, sscale: torch.Tensor, n: torch.Tensor,
                       chunks: int, first: int, chunk: int, scale: float) -> torch.Tensor:
    """chunk_top on GPUs: the int8 bounds of chunks [0, chunks) read where they lie in the layer's whole buffers
    (smin, smax [slots, kv_heads, >= chunks, head_dim], sscale [slots, kv_heads, >= chunks]; q's positive part
    against smax plus its negative part against smin, then each chunk's scale, in one kernel) and ranked by the
    long-row top-k (cache/fused_top.py), instead of dequantizing every bound at every refresh: at 128K that
    copy alone took 420 us per refreshing layer (H100, batch 32). -> chunk indices [b, kv_heads, first],
    in column order."""
    b = q.shape[0]
    upper = fused_dots.bound_dots(q, smin, smax, sscale, chunks, chunk, n)  # [b, kv_heads, group, chunks]
    # A slot with fewer filled chunks than `first` gets them all, then distinct unfilled ones (whose tokens stage
    # two finds not stored): stored_top fills a row's empty picks with its first unstored columns.
    every = torch.full((b,), first, device=q.device)
    return fused_top.stored_top(upper, filled_chunks(chunks, chunk, n), first, scale, every)[0]


def chunk_top_int8(q: torch.Tensor, smin: torch.Tensor, smax: torch.Tensor, sscale: torch.Tensor, n: torch.Tensor,
                   first: int, chunk: int, scale: float, cpu: bool = False) -> torch.Tensor:
    """chunk_top on CPUs with int8 scoring: the bounds are read as int8, in dot_int8's arithmetic (the int16
    query's positive part against smax plus its negative part against smin, then the chunk's scale), not
    dequantized whole at every step of every layer, which cost more than the products. Chunks come best
    first, equal bounds to the lower chunk index. `cpu`: in one C++ op (cache/cpu_kernels.py), with the same
    values and order."""
    if cpu:
        return cpu_kernels.chunk_top_int8(q, smin, smax, sscale, n, first, chunk, scale)
    q16, qs = quantize_query(q)
    upper = (q16.clamp_min(0) @ smax.double().transpose(-1, -2) + q16.clamp_max(0) @ smin.double().transpose(-1, -2))
    upper = upper.float() * (qs * sscale.float().unsqueeze(-2))
    filled = filled_chunks(smin.shape[2], chunk, n)  # [b, 1, chunks]
    logits = upper.masked_fill(~filled.unsqueeze(2), float("-inf")) * scale
    scores = torch.where(filled, torch.log_softmax(logits, dim=-1).amax(dim=2), float("-inf"))
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :first]


def with_latest(chosen: torch.Tensor, n: torch.Tensor, chunk: int, latest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks chosen at the last refresh [b, kv_heads, c] plus the `latest` chunks up to the one holding
    reserve token n - 1 (tokens evicted since the refresh) -> (chunks [b, kv_heads, c + latest], fresh
    [b, kv_heads, c + latest] False where a chunk repeats another)."""
    chosen = chosen.sort(dim=-1).values
    last = ((n - 1).clamp_min(0) // chunk).view(-1, 1, 1)
    recent = (last - torch.arange(latest, device=n.device)).clamp_min(0).expand(-1, chosen.shape[1], -1)
    both = torch.cat([chosen, recent], dim=-1)
    j = torch.arange(both.shape[-1], device=n.device)
    # A chunk repeats another when an earlier entry holds it: sorted neighbours for the chosen ones, any
    # earlier entry for the latest (few).
    repeat = torch.cat([torch.zeros_like(chosen[..., :1], dtype=torch.bool), chosen[..., 1:] == chosen[..., :-1]], dim=-1)
    later = (recent.unsqueeze(-1) == both.unsqueeze(-2)) & (j.view(1, 1, 1, -1) < j[chosen.shape[-1]:].view(1, 1, -1, 1))
    return both, ~torch.cat([repeat, later.any(-1)], dim=-1)


def candidate_top(dots: torch.Tensor, idx: torch.Tensor, rpos: torch.Tensor, n: torch.Tensor,
                  kc: int, scale: float, fresh: torch.Tensor | None = None,
                  ties: bool = False, cpu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage two: the `kc` best candidates idx [b, kv_heads, m] by their q.k `dots` [b, kv_heads, group, m];
    candidates where `fresh` [b, kv_heads, m] is False are skipped (repeats); `ties`, `cpu` as in exact_top."""
    stored = candidate_stored(idx, rpos, n, fresh)
    if cpu:
        return cpu_kernels.group_top(log_probs(dots * scale, stored), stored, kc, idx)
    at, values = top_by_index(group_log_probs(dots * scale, stored), idx if ties else None, kc)
    return idx.gather(2, at), values


def candidate_stored(idx: torch.Tensor, rpos: torch.Tensor, n: torch.Tensor,
                     fresh: torch.Tensor | None) -> torch.Tensor:
    """Which candidates idx [b, kv_heads, m] hold a token (and are `fresh`, when given) -> [b, kv_heads, m]."""
    stored = (idx < n.view(-1, 1, 1)) & (rpos.unsqueeze(1).expand(-1, idx.shape[1], -1).gather(2, idx) >= 0)
    return stored if fresh is None else stored & fresh


def _run(pool, fn, *args):
    # On GPUs inductor fuses each stage's masks, scaling and softmax: about half the eager stage's time.
    return compiled(fn, pool.compile and args[0].is_cuda)(*args)


def select_reserve(pool, layer: int, q: torch.Tensor, n: torch.Tensor, kc: int, span: int = 0,
                   refresh: bool = True, limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `kc` best reserve tokens of slots [0, b) for queries q [b, kv_heads, group, head_dim], given n [b]
    tokens stored among indices [0, span) (0: the capacity) -> (indices, scores) [b, kv_heads, kc]; a score of
    -inf marks an index that holds nothing. Without `refresh`, two-stage selection reuses the chunks its
    stage one chose at the layer's last refresh. `limit` [b]: the picks each slot keeps (its middle), which
    spares the GPU kernels sorting many picks (fused_top.stored_top)."""
    b, scale, span = q.shape[0], pool.head_dim**-0.5, span or pool.cap
    q = q.contiguous()  # a strided query sends the scoring matmul to a much slower kernel on GPUs
    rpos = pool.rpos[:b]
    # Ties go to the lower reserve index wherever the C++ ops may run (CPUs, which order them so) or scores are
    # coarse (int8 scoring), so that the torch code picks what the ops pick.
    ties = pool.int8_scoring or not q.is_cuda
    if not pool.two_stage:
        if pool.int8_scoring and pool.cpu_kernels:
            return cpu_kernels.exact_top_int8(q, *pool.scoring_int8(layer, b, span), rpos[:, :span], n, kc, scale)
        if pool.int8_scoring:
            dots = dot_int8(q, *pool.scoring_int8(layer, b, span))
        elif pool.fused and pool.reserve_int8:
            # The int8 keys are scored as stored: dequantizing the whole reserve first made the step 5x slower.
            dots = fused_dots.reserve_dots(q, *pool.reserve_keys_store(layer), span, n)
        else:
            dots = dot_float(q, pool.reserve_keys(layer, scoring=True)[:b, :, :span])
        if fused_top.applies(pool, kc, span):
            return fused_top.group_top(dots, rpos, n, kc, scale, limit)
        return _run(pool, exact_top, dots, rpos[:, :span], n, kc, scale, ties, pool.cpu_kernels)
    first = pool.first_chunks(kc)
    fresh = None
    if refresh:
        chunks = min(max(-(-span // pool.chunk), first), pool.cap // pool.chunk)
        if pool.int8_scoring and pool.cpu_kernels:
            return cpu_kernels.two_stage_top_int8(q, pool, layer, n, chunks, first, kc, scale)
        if pool.fused:
            chosen = chunk_top_in_place(q, pool.smin[layer], pool.smax[layer], pool.sscale[layer], n, chunks,
                                        first, pool.chunk, scale)
        elif pool.int8_scoring:
            chosen = chunk_top_int8(q, *pool.bounds_of(layer, slice(0, b), chunks), n, first, pool.chunk, scale,
                                    pool.cpu_kernels)
        else:
            chosen = _run(pool, chunk_top, q, *pool.bounds_of(layer, slice(0, b), chunks), n, first, pool.chunk, scale)
        pool.cand[layer][:b, :, :first] = chosen
    else:
        # Between refreshes the chunks chosen last are re-ranked token by token with the current query, with
        # the chunks of tokens evicted since then: every step still picks by its own query.
        latest = (pool.select_every - 1 + pool.chunk - 1) // pool.chunk + 1
        if pool.fused:
            chosen, fresh = fused_dots.with_latest(pool.cand[layer][:b, :, :first], n, pool.chunk, latest)
        else:
            chosen, fresh = with_latest(pool.cand[layer][:b, :, :first].long(), n, pool.chunk, latest)
    if pool.fused:
        # The candidates' keys are read where they lie (cache/fused_dots.py), their stored flags found in the
        # same pass, and ranked by the long-row top-k kernels: gathering them first took most of the step at
        # long contexts. The kernels turn a pick's column into its reserve index (its chunk, its place in it).
        keys, scales = pool.reserve_keys_store(layer)
        dots, stored = fused_dots.chunk_dots_stored(q, keys, chosen, pool.chunk, scales, rpos, n, fresh)
        return fused_top.stored_top(dots, stored, kc, scale, limit, chosen, pool.chunk)
    if pool.int8_scoring and pool.cpu_kernels:
        return cpu_kernels.candidate_top_int8(q, *pool.int8_keys(layer), chosen, pool.rpos, n, pool.chunk, kc, scale,
                                              fresh)
    if fresh is not None:
        fresh = fresh.repeat_interleave(pool.chunk, dim=-1)  # per chunk -> per candidate token
    idx = candidates(chosen, pool.chunk)
    if pool.int8_scoring:
        dots = dot_int8(q, *pool.scoring_int8_rows(layer, idx))
    else:
        dots = dot_float(q, pool.reserve_gather(layer, idx, "ks"))
    return _run(pool, candidate_top, dots, idx, rpos, n, kc, scale, fresh, ties, pool.cpu_kernels)
