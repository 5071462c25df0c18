"""Scoring the reserve by the current query: exactly, or in two stages through chunk bounds.

Both stages rank by the attention a token (or the best token a chunk could hold) would receive: a softmax
of q.k over the candidates, maximised over the KV head's query group, so the two agree when the first
stage keeps every chunk. Scores are log-probabilities: probabilities underflow to exactly 0 for most of a
long reserve, and top-k among equal zeros picks arbitrarily (differently from run to run on a GPU).
"""

from __future__ import annotations

import torch


def group_scores(q: torch.Tensor, keys: torch.Tensor, stored: torch.Tensor, scale: float) -> torch.Tensor:
    """Log of the attention each query would pay each key, max over the group (and queries), -inf where not
    stored.

    q: [b, kv_heads, queries, head_dim]; keys: [b, kv_heads, m, head_dim]; stored: [b, 1 or kv_heads, m]
    -> [b, kv_heads, m].
    """
    logits = (q @ keys.transpose(-1, -2)).float() * scale  # [b, kv_heads, queries, m]
    logits = logits.masked_fill(~stored.unsqueeze(2), float("-inf"))
    scores = torch.log_softmax(logits, dim=-1).amax(dim=2)  # NaN where nothing is stored
    return torch.where(stored, scores, float("-inf"))


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


def select_reserve(pool, layer: int, q: torch.Tensor, n: torch.Tensor, kc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `kc` best reserve tokens of slots [0, b) for queries q [b, kv_heads, group, head_dim], given n [b]
    tokens stored -> (indices, scores) [b, kv_heads, kc]; a score of -inf marks an index that holds nothing."""
    b, scale, rpos = q.shape[0], pool.head_dim**-0.5, pool.rpos[: q.shape[0]]
    if not pool.two_stage:
        keys = pool.reserve_keys(layer, scoring=True)[:b]
        stored = ((torch.arange(keys.shape[2], device=q.device) < n.view(-1, 1)) & (rpos >= 0)).unsqueeze(1)
        top = group_scores(q, keys, stored, scale).topk(kc, dim=-1)
        return top.indices, top.values
    chunks = pool.cap // pool.chunk
    first = -(-pool.oversample * kc // pool.chunk)
    filled = (torch.arange(chunks, device=q.device) * pool.chunk < n.view(-1, 1)).unsqueeze(1)  # [b, 1, chunks]
    bounds = bound_scores(q, pool.smin[layer][:b, :, :chunks], pool.smax[layer][:b, :, :chunks], filled, scale)
    idx = candidates(bounds.topk(first, dim=-1).indices, pool.chunk)  # [b, kv_heads, m]
    keys = pool.reserve_gather(layer, idx, "ks")
    stored = (idx < n.view(-1, 1, 1)) & (rpos.unsqueeze(1).expand(-1, pool.kv_heads, -1).gather(2, idx) >= 0)
    top = group_scores(q, keys, stored, scale).topk(kc, dim=-1)
    return idx.gather(2, top.indices), top.values
