"""Exact selection's last two stages in one Triton kernel (GPUs): group scores and top-k.

After the q.k product, torch spends a compiled log-softmax and a radix-select top-k per layer on every
reserve score (about 50 us per layer at batch 32, budget 256, 4K context: more than the product itself).
Here one program per slot and KV head holds its whole reserve row in registers, takes the log-softmax of
each query head and their maximum (selection.group_scores), and finds the `kc`-th best score by bisection
over the scores' bits, then writes the picks in reserve order: cache/fused.py ranks unsorted picks itself.
tests/fused_check.py holds it to group_scores followed by torch.topk.
"""

from __future__ import annotations

import torch

from slam.cache import fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: selection.exact_top does the same work
    triton = None

SPAN_LIMIT = 8192  # reserve tokens a program holds in registers


def applies(pool, kc: int, span: int) -> bool:
    return pool.fused and fused.ranks_itself(kc) and kc <= span <= SPAN_LIMIT


if triton is not None:

    @triton.jit
    def _group_top(logit_ptr, rpos_ptr, n_ptr, idx_ptr, score_ptr, heads, m, rpos_stride, scale,
                   G: tl.constexpr, KC: tl.constexpr, BLOCK: tl.constexpr):
        # Program pid: slot pid // heads, KV head pid % heads; its logits are rows [pid * G, (pid + 1) * G) of m.
        pid = tl.program_id(0)
        s = pid // heads
        i = tl.arange(0, BLOCK)
        n = tl.load(n_ptr + s)
        rp = tl.load(rpos_ptr + s * rpos_stride + i, mask=i < m, other=-1)
        stored = (i < m) & (i < n) & (rp >= 0)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for g in tl.static_range(G):
            x = tl.load(logit_ptr + (pid * G + g) * m + i, mask=stored, other=float("-inf")) * scale
            top = tl.max(x, 0)
            best = tl.maximum(best, x - (top + tl.log(tl.sum(tl.exp(x - top), 0))))
        best = tl.where(stored, best, float("-inf"))
        # Integer keys ordered like the floats (negative floats' magnitude bits flipped); columns past the
        # reserve rank below -inf. The largest t with at least KC keys >= t is the KC-th best key.
        bits = best.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        key = tl.where(i < m, key, -(1 << 31))
        lo = tl.full([], -(1 << 31), tl.int64)
        hi = tl.full([], (1 << 31) - 1, tl.int64)
        for _ in range(32):
            mid = (lo + hi + 1) // 2
            ok = tl.sum((key >= mid).to(tl.int32), 0) >= KC
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        above = key > lo
        tied = key == lo
        # All keys above the threshold, then tied ones in reserve order until KC are taken.
        take = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= KC - tl.sum(above.to(tl.int32), 0)))
        slot = tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(idx_ptr + pid * KC + slot, i.to(tl.int64), mask=take)
        tl.store(score_ptr + pid * KC + slot, best, mask=take)


def group_top(logits: torch.Tensor, rpos: torch.Tensor, n: torch.Tensor, kc: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, kv_heads, group, m] float32 (q.k unscaled), rpos [b, >= m] (reserve positions, -1: empty),
    n [b] tokens stored -> (indices, scores) [b, kv_heads, kc] of the kc best by group_scores, unordered."""
    b, heads, group, m = logits.shape
    idx = torch.empty(b, heads, kc, dtype=torch.long, device=logits.device)
    score = torch.empty(b, heads, kc, dtype=torch.float32, device=logits.device)
    block = triton.next_power_of_2(m)
    _group_top[(b * heads,)](logits.contiguous(), rpos, n, idx, score, heads, m, rpos.stride(0), scale,
                             G=group, KC=kc, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return idx, score
