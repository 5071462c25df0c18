"""One layer of a prefill chunk for one slot (eager): select, attend over the slot and the chunk, then
write the chunk into the slot, evicting what leaves the ring to the policy.

A token at position p lives in column p when p < sink, else in column sink + middle + (p - sink) % ring
(the ring); it leaves the ring when position p + ring is written. Decode steps use the same rule.
"""

from __future__ import annotations

from typing import Protocol

import torch

from slam.cache import CachePolicy, Evicted
from slam.engine import attention as A
from slam.engine.layer import Layer
from slam.engine.pool import SlotPool


class Runner(Protocol):
    """What a prefill layer reads of the model runner (engine/model_runner.py), which calls it."""

    pool: SlotPool
    rope: A.Rope
    head_dim: int
    q_heads: int
    kv_heads: int
    scale: float


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. On GPUs it is copied from pinned memory without blocking: a copy from pageable
    memory waits for the stream, so it would wait for the decode step launched ahead (async scheduling)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def device_longs(values: list[int], device: torch.device) -> torch.Tensor:
    """values as int64 on `device` (to_device)."""
    return to_device(torch.tensor(values, dtype=torch.long), device)


def column(policy: CachePolicy, p: int) -> int:
    return p if p < policy.sink else policy.sink + policy.middle + (p - policy.sink) % policy.ring


def prefill_layer(runner: Runner, li: int, layer: Layer, x: torch.Tensor, slot: int, policy: CachePolicy,
                  start: int, positions: torch.Tensor) -> torch.Tensor:
    pool, rope, d = runner.pool, runner.rope, runner.head_dim
    t = x.shape[0]
    q, k, v = layer.qkv_heads(x, runner.q_heads, runner.kv_heads, d)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, t, D]
    cos, sin = rope.cos[positions], rope.sin[positions]  # [t, D]
    q_rot, k_rot = A.rotate(q, cos, sin), A.rotate(k, cos, sin)
    evicted_before = policy.counts(start)[3]
    policy.select_prefill(pool, li, slot, q_rot, evicted_before)

    # Attention over the slot's columns (all older than the chunk) and the chunk itself (causal).
    cols = pool.budget + 1
    ppos = pool.pos[li][slot]  # [H, C]
    key_pos = torch.cat([ppos, positions.expand(ppos.shape[0], -1)], dim=1)  # [H, C + t]
    qp = positions.view(1, -1, 1)
    valid = (key_pos.unsqueeze(1) >= 0) & (key_pos.unsqueeze(1) <= qp)  # [H, t, C + t]
    if getattr(policy, "sliding_window", False):
        valid &= (qp - key_pos.unsqueeze(1) < policy.ring) | (key_pos.unsqueeze(1) < policy.sink)
    keys, values = torch.cat([pool.k[li][slot], k_rot], dim=1), torch.cat([pool.v[li][slot], v], dim=1)
    queries = q_rot
    if pool.cache_positions:
        ranks = A.cache_ranks(ppos)  # stored keys are unrotated: they take their rank in the cache
        n_valid = int((ppos[0] >= 0).sum())
        chunk_ranks = torch.arange(n_valid, n_valid + t, device=x.device)
        key_ranks = torch.cat([ranks, chunk_ranks.expand(ranks.shape[0], -1)], dim=1)
        keys = A.rotate(torch.cat([pool.k[li][slot], k], dim=1), rope.cos[key_ranks], rope.sin[key_ranks])
        queries = A.rotate(q, rope.cos[chunk_ranks], rope.sin[chunk_ranks])
    chunk_scores = None
    if policy.prefill_attention:
        out, probs = A.attend_with_probs(queries[None], keys[None], values[None], valid[None], runner.scale)
        chunk_scores = policy.observe_prefill(pool, li, slot, probs[0], cols, positions)
    else:
        out = A.attend(queries[None], keys[None], values[None], valid[None], runner.scale)
    x = x + layer.o(out[0].transpose(0, 1).reshape(t, -1))

    write_chunk(runner, li, slot, policy, start, k if pool.cache_positions else k_rot, v, chunk_scores, k_rot)
    return x + layer.mlp(x)


def write_chunk(runner: Runner, li: int, slot: int, policy: CachePolicy, start: int, k: torch.Tensor,
                v: torch.Tensor, scores: torch.Tensor | None, k_rot: torch.Tensor) -> None:
    """Evict what leaves the ring, oldest first, then store the chunk's surviving tokens in their columns."""
    pool = runner.pool
    k, v, k_rot = (t.to(pool.dtype) for t in (k, v, k_rot))
    end = start + k.shape[1]
    if scores is None:
        scores = torch.zeros(k.shape[:2], device=k.device)
    first = max(policy.sink, start - policy.ring)  # oldest token still in the ring before the chunk
    last = max(first, end - policy.ring)  # tokens [first, last) leave the ring during this chunk
    if last > first and (policy.uses_reserve or policy.keeps_scores):
        old = [column(policy, p) for p in range(first, min(last, start))]
        new = slice(max(first, start) - start, max(last, start) - start)
        idx = device_longs(old, k.device)
        pos = torch.arange(first, last, device=k.device)
        ev = Evicted(
            k=torch.cat([pool.k[li][slot][:, idx], k[:, new]], dim=1),
            v=torch.cat([pool.v[li][slot][:, idx], v[:, new]], dim=1),
            pos=pos,
            score=torch.cat([pool.score[li][slot][:, idx], scores[:, new]], dim=1),
        )
        if pool.cache_positions and policy.uses_reserve:
            cos, sin = runner.rope.cos[pos], runner.rope.sin[pos]
            old_rot = A.rotate(pool.k[li][slot][:, idx], cos[: len(old)], sin[: len(old)])
            ev.k_score = torch.cat([old_rot.to(pool.dtype), k_rot[:, new]], dim=1)
        policy.evict_prefill(pool, li, slot, ev, policy.counts(start)[3])
    keep = [p for p in range(start, end) if p < policy.sink or p >= last]
    if keep:
        cols = device_longs([column(policy, p) for p in keep], k.device)
        src = device_longs([p - start for p in keep], k.device)
        pool.k[li][slot][:, cols] = k[:, src]
        pool.v[li][slot][:, cols] = v[:, src]
        pool.pos[li][slot][:, cols] = src + start
        pool.score[li][slot][:, cols] = scores[:, src]
