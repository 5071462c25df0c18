"""slam's per-step append to the reserve in one Triton kernel (GPUs): each slot's evicted token written to the
reserve (quantized where the reserve is int8) and folded into its chunk's bounds.

Eagerly this is about fifty small kernels per layer and step (the int8 rounding of keys and values, then a
gather, the requantization of grown bounds and a scatter per bound buffer), each a few microseconds of a
CUDA graph's replay for a few bytes of work. Here one program per slot and KV head does it all, with the
eager code's arithmetic (IEEE division, round half to even, floor and ceil), so both leave the same bytes.
The pool calls it from append_evicted; tests/fused_check.py holds it to pool.reserve_append and
pool.summarize_append.
"""

from __future__ import annotations

import torch

from slam.engine.bounds import OUTWARD

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the pool's eager writes do the same work
    triton = None


if triton is not None:

    @triton.jit
    def _rint(x):
        # Round half to even (torch.round): x - floor(x) is exact for the magnitudes quantized here.
        t = tl.math.floor(x)
        f = x - t
        odd = (t.to(tl.int32) & 1) != 0
        return t + tl.where((f > 0.5) | ((f == 0.5) & odd), 1.0, 0.0)

    @triton.jit
    def _int8(x):
        return tl.minimum(tl.maximum(x, -127.0), 127.0).to(tl.int8)

    @triton.jit
    def _quantized(x, out_ptr, scale_ptr, row, at):
        # pool.quantize_rows with float32 scales: max |x| / 127 per row, x / scale rounded; at: the row's elements.
        s = tl.maximum(tl.max(tl.abs(x), 0), 1e-8) * (1 / 127.0)
        tl.store(out_ptr + at, _int8(_rint(tl.math.div_rn(x, s))))
        tl.store(scale_ptr + row, s)

    @triton.jit
    def _fold(buf_ptr, at, k, s, old_s, first, keep, LOW: tl.constexpr):
        # bounds.summarize_append for one bound buffer: the new key alone (a chunk's first token), folded into
        # the stored integers (same scale), or the old bound requantized against a grown scale; outward.
        old = tl.load(buf_ptr + at).to(tl.float32)
        if LOW:
            new_q = tl.math.floor(tl.math.div_rn(k, s))
            grown = tl.math.floor(tl.math.div_rn(tl.minimum(old * old_s, k), s))
            kept = tl.minimum(old, new_q)
        else:
            new_q = tl.math.ceil(tl.math.div_rn(k, s))
            grown = tl.math.ceil(tl.math.div_rn(tl.maximum(old * old_s, k), s))
            kept = tl.maximum(old, new_q)
        tl.store(buf_ptr + at, _int8(tl.where(first, new_q, tl.where(keep, kept, grown))))

    @triton.jit
    def _append(k_ptr, v_ptr, at_ptr, rk_ptr, rv_ptr, rks_ptr, rvs_ptr, smin_ptr, smax_ptr, sscale_ptr, heads,
                rows, chunks, outward, D: tl.constexpr, CHUNK: tl.constexpr, INT8: tl.constexpr,
                BOUNDS: tl.constexpr):
        # Program pid: slot pid // heads, KV head pid % heads; its token goes to reserve index at_ptr[slot] (the
        # scratch index for slots that append nothing), and its chunk's bounds (of `chunks` per head) take it.
        pid = tl.program_id(0)
        at = tl.load(at_ptr + pid // heads)
        d = tl.arange(0, D)
        k = tl.load(k_ptr + pid * D + d)
        v = tl.load(v_ptr + pid * D + d)
        row = pid.to(tl.int64) * rows + at
        if INT8:
            _quantized(k.to(tl.float32), rk_ptr, rks_ptr, row, row * D + d)
            _quantized(v.to(tl.float32), rv_ptr, rvs_ptr, row, row * D + d)
        else:
            tl.store(rk_ptr + row * D + d, k.to(rk_ptr.dtype.element_ty))
            tl.store(rv_ptr + row * D + d, v.to(rv_ptr.dtype.element_ty))
        if BOUNDS:
            kf = k.to(tl.float32)
            c = pid.to(tl.int64) * chunks + at // CHUNK
            first = at % CHUNK == 0
            kmax = tl.maximum(tl.max(tl.abs(kf), 0), 1e-30) * outward
            old_s = tl.load(sscale_ptr + c)
            scale = tl.where(first, kmax, tl.maximum(old_s, kmax))
            keep = ~first & (scale == old_s)  # the same scale: the stored integers stay exact
            _fold(smin_ptr, c * D + d, kf, scale, old_s, first, keep, LOW=True)
            _fold(smax_ptr, c * D + d, kf, scale, old_s, first, keep, LOW=False)
            tl.store(sscale_ptr + c, scale)


def append(pool, layer: int, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """pool.reserve_append, then (two stages running) pool.summarize_append of the same keys, in one kernel:
    one evicted token per slot of [0, b) at reserve index at [b]; k, v: [b, kv_heads, head_dim]."""
    b, heads, d = k.shape
    k, v = (x.to(pool.dtype).contiguous() for x in (k, v))
    scales = (pool.rk_scale[layer], pool.rv_scale[layer]) if pool.reserve_int8 else (k, k)  # unread unless int8
    bounds = (pool.smin[layer], pool.smax[layer], pool.sscale[layer]) if pool.two_stage else (k, k, k)
    chunks = pool.smin[layer].shape[2] if pool.two_stage else 0
    _append[(b * heads,)](k, v, at, pool.rk[layer], pool.rv[layer], *scales, *bounds, heads, pool.cap + 1, chunks,
                          OUTWARD / 127, D=d, CHUNK=max(pool.chunk, 1), INT8=pool.reserve_int8,
                          BOUNDS=pool.two_stage)
