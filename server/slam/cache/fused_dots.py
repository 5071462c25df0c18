"""Reserve keys scored where they lie (GPUs): two-stage selection's second stage, and exact scoring of an
int8 reserve.

Stage one chooses whole chunks of the reserve, so each candidate chunk is `chunk` contiguous key rows. The
eager path gathers every candidate row into a new tensor and multiplies that: at budget 2048 and 32K
context the gather alone took 60% of a decode step. Here each program reads 16 chunks' keys straight from
the reserve (pinned host memory included) and multiplies them with the KV head's query group on the tensor
cores. Int8 keys are read as stored and scaled after the product; the eager path dequantized the whole
reserve at every step, which made an int8 reserve 5x slower than bfloat16. tests/fused_check.py holds both
to the gather (or the dequantized keys) and dot_float.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: selection.select_reserve gathers instead
    triton = None

# Launch settings, module-level so that e2e/micro_kernels.py can sweep them on a GPU. Two warps per program
# measured fastest for both products on an H100 (stage two at 32K: SmolLM2 15.2 us against 19.0 at four, Llama-8B
# 35.2 against 41.8; stage one: 24.6 against 28.3 and 57.9 against 60.8; docs/benchmarks.md).
CHUNKS = 16  # stage two: chunks per program
DOTS_WARPS = 2
BOUND_ROWS = 64  # stage one: chunks per program
BOUND_WARPS = 2


if triton is not None:

    @triton.jit
    def _chunk_dots(q_ptr, k_ptr, s_ptr, chunk_ptr, out_ptr, rows, c, rpos_ptr, n_ptr, fresh_ptr, flag_ptr, heads,
                    rpos_stride, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                    R: tl.constexpr, IEEE: tl.constexpr, SCALED: tl.constexpr, ALL: tl.constexpr,
                    FLAGS: tl.constexpr, FRESH: tl.constexpr):
        # Program (row, blk): row = slot * kv_heads + head, whose reserve keys start at row * rows; candidates
        # [blk * R, (blk + 1) * R), candidate t being token t % CHUNK of chunk chunk_ptr[row, t // CHUNK]
        # (ALL: of chunk t // CHUNK, every chunk in order). SCALED: int8 keys, one float32 scale per token;
        # their integers are exact in the query's dtype, so the scale applies to the product. FLAGS: also
        # whether each candidate holds a token (index below the slot's n, a position stored, and its chunk
        # fresh[row, t // CHUNK] when FRESH), written to flag_ptr [row, c * CHUNK]. Keys at reserve indices from
        # the slot's n_ptr on are not read (their products are 0): under CUDA graphs the candidates span the
        # reserve's capacity, and a short request beside a long one would otherwise read the long one's worth.
        pid = tl.program_id(0)
        t = tl.program_id(1) * R + tl.arange(0, R)
        ok = t < c * CHUNK
        if ALL:
            chunk = (t // CHUNK).to(tl.int64)
        else:
            chunk = tl.load(chunk_ptr + pid * c + t // CHUNK, mask=ok, other=0).to(tl.int64)
        slot = pid // heads
        index = chunk * CHUNK + t % CHUNK  # the candidate's reserve index
        read = ok & (index < tl.load(n_ptr + slot))
        at = pid.to(tl.int64) * rows + index
        dd = tl.arange(0, D)
        g = tl.arange(0, GP)
        q = tl.load(q_ptr + (pid * G + g[:, None]) * D + dd[None, :], mask=g[:, None] < G, other=0.0)  # [GP, D]
        k = tl.load(k_ptr + at[:, None] * D + dd[None, :], mask=read[:, None], other=0)  # [R, D]
        if SCALED:
            k = k.to(q.dtype)
        if IEEE:
            dots = tl.dot(k, tl.trans(q), input_precision="ieee")  # [R, GP] float32
        else:
            dots = tl.dot(k, tl.trans(q))
        if SCALED:
            dots = dots * tl.load(s_ptr + at, mask=read, other=0.0)[:, None]
        out = out_ptr + (pid * G + g[None, :]).to(tl.int64) * (c * CHUNK) + t[:, None]
        tl.store(out, dots, mask=ok[:, None] & (g[None, :] < G))
        if FLAGS:
            held = read & (tl.load(rpos_ptr + slot.to(tl.int64) * rpos_stride + index, mask=read, other=-1) >= 0)
            if FRESH:
                held = held & (tl.load(fresh_ptr + pid * c + t // CHUNK, mask=ok, other=0) != 0)
            tl.store(flag_ptr + pid.to(tl.int64) * (c * CHUNK) + t, held.to(tl.int8), mask=ok)


    @triton.jit
    def _latest(cand_ptr, n_ptr, both_ptr, fresh_ptr, heads, cand_slot, cand_head, first, chunk, latest,
                FP: tl.constexpr, LP: tl.constexpr):
        # Program pid: slot pid // heads, KV head pid % heads. selection.with_latest for its row: the chunks
        # chosen last, sorted, then the `latest` chunks up to the one holding token n - 1; an entry repeating
        # an earlier one is not fresh. The sorted row goes through both_ptr to be compared with its neighbour.
        pid = tl.program_id(0)
        s = pid // heads
        width = first + latest
        j = tl.arange(0, FP)
        c = tl.sort(tl.load(cand_ptr + s * cand_slot + (pid % heads) * cand_head + j, mask=j < first,
                            other=2**31 - 1))
        tl.store(both_ptr + pid * width + j, c, mask=j < first)
        tl.debug_barrier()
        prev = tl.load(both_ptr + pid * width + j - 1, mask=(j > 0) & (j < first), other=-1)
        tl.store(fresh_ptr + pid * width + j, (c != prev).to(tl.int8), mask=j < first)
        last = tl.maximum(tl.load(n_ptr + s) - 1, 0) // chunk
        i = tl.arange(0, LP)
        recent = tl.maximum(last - i, 0)  # past the reserve's first chunk they repeat chunk 0
        chosen = tl.sum((c[None, :] == recent[:, None]).to(tl.int32), 1) > 0
        tl.store(both_ptr + pid * width + first + i, recent, mask=i < latest)
        tl.store(fresh_ptr + pid * width + first + i, ((i <= last) & ~chosen).to(tl.int8), mask=i < latest)


    @triton.jit
    def _bound_dots(q_ptr, lo_ptr, hi_ptr, s_ptr, out_ptr, rows, c, n_ptr, heads, chunk, G: tl.constexpr,
                    GP: tl.constexpr, D: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr):
        # Program (row, blk): chunks [blk * R, (blk + 1) * R) of row = slot * kv_heads + head, whose int8
        # bounds start at row * rows. A chunk's upper bound of q.k: q's positive part against its maxima plus
        # its negative part against its minima, in one float32 accumulator, then the chunk's scale. Chunks
        # holding no token (from the slot's n) are not read; their bounds are 0.
        pid = tl.program_id(0)
        t = tl.program_id(1) * R + tl.arange(0, R)
        read = (t < c) & (t * chunk < tl.load(n_ptr + pid // heads))
        at = pid.to(tl.int64) * rows + t
        dd = tl.arange(0, D)
        g = tl.arange(0, GP)
        q = tl.load(q_ptr + (pid * G + g[:, None]) * D + dd[None, :], mask=g[:, None] < G, other=0.0)  # [GP, D]
        hi = tl.load(hi_ptr + at[:, None] * D + dd[None, :], mask=read[:, None], other=0).to(q.dtype)  # [R, D]
        lo = tl.load(lo_ptr + at[:, None] * D + dd[None, :], mask=read[:, None], other=0).to(q.dtype)
        pos, neg = tl.maximum(q, 0.0).to(q.dtype), tl.minimum(q, 0.0).to(q.dtype)  # the literal promotes to float32
        if IEEE:
            dots = tl.dot(hi, tl.trans(pos), input_precision="ieee")  # [R, GP] float32
            dots = tl.dot(lo, tl.trans(neg), acc=dots, input_precision="ieee")
        else:
            dots = tl.dot(hi, tl.trans(pos))
            dots = tl.dot(lo, tl.trans(neg), acc=dots)
        dots = dots * tl.load(s_ptr + at, mask=read, other=0.0)[:, None]
        out = out_ptr + (pid * G + g[None, :]).to(tl.int64) * c + t[:, None]
        tl.store(out, dots, mask=(t < c)[:, None] & (g[None, :] < G))


def bound_dots(q: torch.Tensor, smin: torch.Tensor, smax: torch.Tensor, sscale: torch.Tensor, chunks: int,
               chunk: int, n: torch.Tensor) -> torch.Tensor:
    """Stage one's upper bounds of q.k over chunks [0, chunks) of slots [0, b), read where the int8 bounds lie
    (smin, smax [slots, kv_heads, >= chunks, head_dim], sscale [slots, kv_heads, >= chunks] float32): the
    float32 sum of q's positive part against smax and its negative part against smin, times the chunk's
    scale, in one pass (selection.upper_bound of the dequantized bounds) -> [b, kv_heads, group, chunks]
    float32. n [b]: tokens stored; chunks past them read as 0."""
    b, heads, group, d = q.shape
    out = torch.empty(b, heads, group, chunks, dtype=torch.float32, device=q.device)
    r = BOUND_ROWS
    _bound_dots[(b * heads, triton.cdiv(chunks, r))](
        q.contiguous(), smin, smax, sscale, out, smin.shape[2], chunks, n, heads, chunk, G=group,
        GP=max(16, triton.next_power_of_2(group)), D=d, R=r, IEEE=q.dtype == torch.float32, num_warps=BOUND_WARPS)
    return out


def chunk_dots_stored(q: torch.Tensor, keys: torch.Tensor, chunks: torch.Tensor, chunk: int,
                      scales: torch.Tensor | None, rpos: torch.Tensor, n: torch.Tensor,
                      fresh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage two's candidates scored where they lie, and in the same pass which of them hold a token
    (selection.candidate_stored). q [b, kv_heads, group, head_dim]; keys [slots, kv_heads, rows, head_dim] (a
    reserve, slots >= b), int8 with `scales` [slots, kv_heads, rows] float32 or in q's dtype; chunks [b,
    kv_heads, c] chunk indices; rpos [>= b, rows] the slots' positions (-1: empty), n [b] tokens stored, fresh
    [b, kv_heads, c] per chunk or None -> (q.k [b, kv_heads, group, c * chunk] float32, stored [b, kv_heads,
    c * chunk] bool), candidate order as selection.candidates(chunks, chunk). Building every candidate's
    reserve index and looking up its position took a dozen eager ops over 1.5M candidates a layer at 128K."""
    c = chunks.shape[2]
    stored = (rpos, fresh.contiguous() if fresh is not None else None)
    return _dots(q, keys, scales, chunks.contiguous(), c, chunk, triton.next_power_of_2(CHUNKS * chunk), n, stored)


def with_latest(cand: torch.Tensor, n: torch.Tensor, chunk: int, latest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """selection.with_latest in one kernel: cand [b, kv_heads, c] int32 (a view of the pool's buffer) -> (chunks
    [b, kv_heads, c + latest] int64, fresh [b, kv_heads, c + latest] bool), equal to the eager result."""
    b, heads, first = cand.shape
    both = torch.empty(b, heads, first + latest, dtype=torch.long, device=cand.device)
    fresh = torch.empty(b, heads, first + latest, dtype=torch.bool, device=cand.device)
    _latest[(b * heads,)](cand, n, both, fresh.view(torch.int8), heads, cand.stride(0), cand.stride(1), first, chunk,
                          latest, FP=max(triton.next_power_of_2(first), 16), LP=max(triton.next_power_of_2(latest), 2))
    return both, fresh


def reserve_dots(q: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor | None, span: int, n: torch.Tensor
                 ) -> torch.Tensor:
    """q.k over reserve indices [0, span) of slots [0, b): selection.dot_float of the reserve's first `span`
    keys without reading them into a new tensor (int8 keys with their `scales` too) -> [b, kv_heads, group,
    span] float32. Only each slot's first n [b] keys are read; the products of the others are 0."""
    return _dots(q, keys, scales, None, span, 1, 128, n)[0]


def _dots(q, keys, scales, chunks, c: int, chunk: int, r: int, n: torch.Tensor, stored=None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, heads, group, d = q.shape
    out = torch.empty(b, heads, group, c * chunk, dtype=torch.float32, device=q.device)
    flags = torch.empty(b, heads, c * chunk, dtype=torch.bool, device=q.device) if stored else None
    rpos, fresh = stored or (out, None)
    scaled = scales is not None
    _chunk_dots[(b * heads, triton.cdiv(c * chunk, r))](
        q.contiguous(), keys, scales.float() if scaled else keys, keys if chunks is None else chunks, out,
        keys.shape[2], c, rpos, n, out if fresh is None else fresh, out if flags is None else flags.view(torch.int8),
        heads, rpos.stride(0) if stored else 0, G=group, GP=max(16, triton.next_power_of_2(group)), D=d,
        CHUNK=chunk, R=r, IEEE=q.dtype == torch.float32, SCALED=scaled, ALL=chunks is None,
        FLAGS=stored is not None, FRESH=fresh is not None, num_warps=DOTS_WARPS)
    return out, flags
