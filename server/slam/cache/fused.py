"""Two Triton kernels that put slam's chosen tokens into the middle columns (GPUs).

Eagerly, placement takes about twenty small kernels per layer (churn, columns, gathers, writes). Here one
program per slot and KV head decides where each pick goes, as slam.keep_columns does: a token chosen again
stays in the column that holds it, newcomers take the columns of tokens that left, in pick order, and
columns left over are emptied. It finds held tokens through `pool.home`, a map from reserve index to column
that it fills and clears again. A second kernel, in programs of 64 picks, then copies only the newcomers'
rows straight from the reserve (pinned host memory included; an int8 reserve's rows dequantized as they are
read). On real text about a third of the chosen tokens are new at each step.

`SlamPolicy.select` uses it instead of `place()` on CUDA devices when Triton is installed and the engine's
`compile` setting is on. tests/fused_check.py holds it to `place()`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the eager path does the same work
    triton = None


KEEP_WARPS = 8  # warps of the placement's program per row where its picks fill 1,024 columns or more
COPY_BLOCK = 64  # picks per copy program
COPY_WARPS = 4


def available(pool) -> bool:
    return triton is not None and pool.device.type == "cuda"


if triton is not None:

    @triton.jit
    def _keep(idx_ptr, score_ptr, rpos_ptr, pos_ptr, ridx_ptr, home_ptr, open_ptr, dest_ptr, take_ptr, sink_ptr,
              replaced_ptr, heads, rows, cols, kc, BLOCK: tl.constexpr):
        # Program pid: slot s = pid // heads, KV head pid % heads. Its middle columns are sink + c for c < take;
        # pick j may go to one of them only while j < take (the picks' first `take` are the slot's best).
        # The phases read what earlier phases wrote to the map, hence the barriers.
        pid = tl.program_id(0)
        s = pid // heads
        c = tl.arange(0, BLOCK)
        take = tl.load(take_ptr + s)
        sink = tl.load(sink_ptr + s)
        usable = (c < take) & (c < kc)
        col = pid * cols + sink + c
        home = home_ptr + pid.to(tl.int64) * rows
        held = tl.load(ridx_ptr + col, mask=usable, other=-1)
        has = usable & (held >= 0)
        tl.store(home + held, c, mask=has)
        idx = tl.load(idx_ptr + pid * kc + c, mask=usable, other=0)
        chosen = usable & (tl.load(score_ptr + pid * kc + c, mask=usable, other=float("-inf")) > float("-inf"))
        tl.debug_barrier()
        owner = has & (tl.load(home + held, mask=has, other=-1) == c)  # a token held twice keeps one column
        hit = chosen & (tl.load(home + idx, mask=chosen, other=-1) >= 0)
        tl.debug_barrier()
        tl.store(home + idx, -2, mask=chosen)
        tl.debug_barrier()
        kept = owner & (tl.load(home + held, mask=owner, other=-1) == -2)
        tl.debug_barrier()
        tl.store(home + held, -1, mask=has)  # the map is left as found: all -1
        tl.store(home + idx, -1, mask=chosen)
        # The n-th newcomer takes the n-th column whose token left (through `open_ptr`, rank -> column).
        free = usable & ~kept
        newcomer = chosen & ~hit
        rank = tl.cumsum(free.to(tl.int32), 0) - 1
        nth = tl.cumsum(newcomer.to(tl.int32), 0) - 1
        fresh = tl.sum(newcomer.to(tl.int32), 0)
        tl.store(open_ptr + pid * kc + rank, c, mask=free & (rank < fresh))
        tl.debug_barrier()
        to = sink + tl.load(open_ptr + pid * kc + nth, mask=newcomer, other=0)
        tl.store(dest_ptr + pid * kc + c, tl.where(newcomer, to, -1), mask=c < kc)
        tl.store(pos_ptr + pid * cols + to, tl.load(rpos_ptr + s * rows + idx, mask=newcomer, other=-1), mask=newcomer)
        tl.store(ridx_ptr + pid * cols + to, idx, mask=newcomer)
        left = free & (rank >= fresh)
        tl.store(pos_ptr + col, -1, mask=left)
        tl.store(ridx_ptr + col, -1, mask=left)
        tl.atomic_add(replaced_ptr + s, fresh.to(tl.int64))

    @triton.jit
    def _copy(idx_ptr, dest_ptr, rk_ptr, rv_ptr, rks_ptr, rvs_ptr, k_ptr, v_ptr, rows, cols, kc,
              BLOCK: tl.constexpr, D: tl.constexpr, INT8: tl.constexpr):
        # Program (pid, blk): slot and KV head pid, picks [blk * BLOCK, (blk + 1) * BLOCK); a pick with a
        # destination column (a newcomer) copies its key and value rows there.
        pid = tl.program_id(0)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        to = tl.load(dest_ptr + pid * kc + j, mask=j < kc, other=-1)
        go = to >= 0
        idx = tl.load(idx_ptr + pid * kc + j, mask=go, other=0)
        d = tl.arange(0, D)
        row = pid.to(tl.int64) * rows + idx
        src = row[:, None] * D + d[None, :]
        dst = (pid * cols + to)[:, None] * D + d[None, :]
        m = go[:, None]
        k = tl.load(rk_ptr + src, mask=m)
        v = tl.load(rv_ptr + src, mask=m)
        if INT8:  # dequantized as the pool's _scaled does: float32 products, then the pool's dtype
            k = (k.to(tl.float32) * tl.load(rks_ptr + row, mask=go, other=0.0)[:, None]).to(k_ptr.dtype.element_ty)
            v = (v.to(tl.float32) * tl.load(rvs_ptr + row, mask=go, other=0.0)[:, None]).to(v_ptr.dtype.element_ty)
        tl.store(k_ptr + dst, k, mask=m)
        tl.store(v_ptr + dst, v, mask=m)


def place(pool, layer: int, plan, idx: torch.Tensor, score: torch.Tensor, mine: torch.Tensor) -> None:
    """cache/slam.py's place() in two kernels: columns [sink, sink + middle) of each slam slot of [0, b) take
    its chosen reserve tokens idx [b, kv_heads, kc] (score -inf: nothing found), a token chosen again staying
    in its column, and the newcomers count into pool.replaced. A slot's first `middle` picks must be its best,
    in any order (best first, or the top-k kernels' `limit`)."""
    b, heads, kc = idx.shape
    rows = b * heads
    take = plan.once("slam take", lambda: torch.where(mine, plan.middle, 0))  # [b] middle columns (0: not slam)
    open_at = torch.empty(rows, kc, dtype=torch.int32, device=idx.device)
    dest = torch.empty(rows, kc, dtype=torch.int32, device=idx.device)
    idx, score = idx.contiguous(), score.contiguous()
    block = max(triton.next_power_of_2(kc), 16)
    _keep[(rows,)](idx, score, pool.rpos, pool.pos[layer], pool.ridx[layer], pool.home, open_at, dest, take,
                   plan.sink, pool.replaced, heads, pool.cap + 1, pool.budget + 1, kc, BLOCK=block,
                   num_warps=KEEP_WARPS if block >= 1024 else 4)
    rk, rv = pool.rk[layer], pool.rv[layer]
    scales = (pool.rk_scale[layer], pool.rv_scale[layer]) if pool.reserve_int8 else (rk, rv)  # unread unless int8
    _copy[(rows, triton.cdiv(kc, COPY_BLOCK))](idx, dest, rk, rv, *scales, pool.k[layer], pool.v[layer],
                                               pool.cap + 1, pool.budget + 1, kc, BLOCK=COPY_BLOCK, D=pool.head_dim,
                                               INT8=pool.reserve_int8, num_warps=COPY_WARPS)
