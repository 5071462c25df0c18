"""One Triton kernel that puts slam's chosen tokens into the middle columns (GPUs).

After top-k, the eager path spends about twenty small kernels per layer on gathering the chosen keys,
values and positions, counting churn and writing the columns; here programs of 64 picks per slot and KV
head do all of it, reading the rows straight from the reserve (pinned host memory included).
`SlamPolicy.select` uses it instead of `place()` on CUDA devices when Triton is installed, the engine's
`compile` setting is on; an int8 reserve's rows are dequantized as they are read. tests/fused_check.py holds
it to `place()`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the eager path does the same work
    triton = None


def available(pool) -> bool:
    return triton is not None and pool.device.type == "cuda"


if triton is not None:

    @triton.jit
    def _apply(idx_ptr, score_ptr, rpos_ptr, rk_ptr, rv_ptr, rks_ptr, rvs_ptr, k_ptr, v_ptr, pos_ptr, ridx_ptr,
               old_ptr, take_ptr, sink_ptr, replaced_ptr, heads, rows, cols, kc: tl.constexpr, BLOCK: tl.constexpr,
               D: tl.constexpr, RANKED: tl.constexpr, INT8: tl.constexpr):
        # Program (pid, blk): slot s = pid // heads, KV head pid % heads, picks [blk * BLOCK, (blk + 1) * BLOCK).
        # Reserve rows live at (pid * rows + i) * D, pool columns at (pid * cols + c) * D.
        pid = tl.program_id(0)
        s = pid // heads
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        base = pid * kc
        middle = tl.load(take_ptr + s)  # columns this slot's middle has (0: not a slam slot)
        score = tl.load(score_ptr + base + j, mask=j < kc, other=float("-inf"))
        idx = tl.load(idx_ptr + base + j, mask=j < kc, other=0)
        sink = tl.load(sink_ptr + s)
        # With few picks top-k leaves them unsorted (RANKED): each one's rank by score is its column, and the
        # slot keeps its best `middle` (equal scores rank by pick order; only picks that found nothing tie in
        # practice). Many picks come sorted, best first, and their churn is counted outside: both pairwise
        # comparisons grow with the square of the picks. Churn: chosen tokens that no middle column held
        # before this step (`old_ptr`: a copy taken before any program writes).
        rank = j
        if RANKED:
            rank = tl.zeros([BLOCK], dtype=tl.int32)
            hit = tl.zeros([BLOCK], dtype=tl.int32)
            for t in range(0, kc, BLOCK):
                jo = t + tl.arange(0, BLOCK)
                other = tl.load(score_ptr + base + jo, mask=jo < kc, other=float("-inf"))
                better = (other[None, :] > score[:, None]) | ((other[None, :] == score[:, None]) & (jo[None, :] < j[:, None]))
                rank += tl.sum(better.to(tl.int32), axis=1)
                old = tl.load(old_ptr + pid * cols + sink + jo, mask=(jo < middle) & (jo < kc), other=-1)
                hit += tl.sum((old[None, :] == idx[:, None]).to(tl.int32), axis=1)
        take = (j < kc) & (rank < middle)
        found = take & (score > float("-inf"))
        col = sink + rank
        if RANKED:
            tl.atomic_add(replaced_ptr + s, tl.sum((found & (hit == 0)).to(tl.int64)))
        pos = tl.load(rpos_ptr + s * rows + idx, mask=found, other=-1)
        tl.store(pos_ptr + pid * cols + col, pos, mask=take)
        tl.store(ridx_ptr + pid * cols + col, tl.where(found, idx, -1), mask=take)
        d = tl.arange(0, D)
        src = (pid * rows + idx)[:, None] * D + d[None, :]
        dst = (pid * cols + col)[:, None] * D + d[None, :]
        m = take[:, None]
        k = tl.load(rk_ptr + src, mask=m)
        v = tl.load(rv_ptr + src, mask=m)
        if INT8:  # dequantized as the pool's _scaled does: float32 products, then the pool's dtype
            row = pid * rows + idx
            k = (k.to(tl.float32) * tl.load(rks_ptr + row, mask=take, other=0.0)[:, None]).to(k_ptr.dtype.element_ty)
            v = (v.to(tl.float32) * tl.load(rvs_ptr + row, mask=take, other=0.0)[:, None]).to(v_ptr.dtype.element_ty)
        tl.store(k_ptr + dst, k, mask=m)
        tl.store(v_ptr + dst, v, mask=m)


RANK_LIMIT = 256  # picks up to which the kernel ranks them itself (above: top-k sorts them)


def ranks_itself(kc: int) -> bool:
    return kc <= RANK_LIMIT


def place(pool, layer: int, plan, idx: torch.Tensor, score: torch.Tensor, mine: torch.Tensor) -> None:
    """cache/slam.py's place() in one kernel: columns [sink, sink + middle) of each slam slot of [0, b) take
    its best `middle` chosen reserve tokens idx [b, kv_heads, kc], best first, and the newcomers count into
    pool.replaced. The columns end up holding what place() leaves there, though in rank order: place() keeps
    a token chosen again in its column, which saves CPUs copying rows and would cost this kernel a second
    pass over the picks. The picks may come in any order when ranks_itself(kc); else a slot's first `middle` picks
    must be its best (best first, or fused_top.stored_top's `limit`)."""
    b, heads, kc = idx.shape
    take = torch.where(mine, plan.middle, 0)  # [b] middle columns written per slot
    ranked = ranks_itself(kc)
    if ranked:
        old = pool.ridx[layer][:b].clone()  # what the columns held, read by every program before any writes
    else:
        old = pool.ridx[layer][:b]  # not read: the kernel's churn count is off here
        col = pool.middle_columns(plan.sink, take, kc)
        pool.replaced[:b] += pool.churn(layer, col, idx, (score > float("-inf")) & (col < pool.budget))
    block = 64
    rk, rv = pool.rk[layer], pool.rv[layer]
    scales = (pool.rk_scale[layer], pool.rv_scale[layer]) if pool.reserve_int8 else (rk, rv)  # unread unless int8
    _apply[(b * heads, triton.cdiv(kc, block))](
        idx.contiguous(), score.contiguous(), pool.rpos, rk, rv, *scales, pool.k[layer], pool.v[layer],
        pool.pos[layer], pool.ridx[layer], old, take, plan.sink, pool.replaced, heads, pool.cap + 1,
        pool.budget + 1, kc=kc, BLOCK=block, D=pool.head_dim, RANKED=ranked, INT8=pool.reserve_int8)
