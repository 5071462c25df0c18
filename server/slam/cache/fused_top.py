"""Selection's last two stages in Triton kernels (GPUs): group scores and top-k.

After the q.k product, torch spends a compiled log-softmax and a radix-select top-k per layer on every
reserve score (about 50 us per layer at batch 32, budget 256, 4K context: more than the product itself).
Here one program per slot and KV head holds its whole row in registers (exact scoring's reserve, stage
two's candidates, stage one's chunks: up to SPAN_LIMIT columns), takes the log-softmax of each query head
and their maximum (selection.group_scores), and finds the `kc`-th best score by bisection over the scores'
bits, then writes the picks in column order, each slot's best `middle` first (the columns it has:
cache/fused.py places those in any order). Longer rows go through kernels over blocks of the row instead:
each block's log-sum-exp parts; each token's group score as an integer key ordered like the float, with the
first of four 8-bit radix passes; the other passes, whose blocks add into one histogram per row (the keys
are in L2 by then); the picks. One program per row took longer than the q.k product there (122 us per layer
at 32K, batch 32: the rows are few and long). tests/fused_check.py holds both to group_scores followed by
torch.topk.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: selection.exact_top does the same work
    triton = None

SPAN_LIMIT = 8192  # columns of a row one program holds in registers (longer rows: the block kernels)
BLOCK = 4096  # columns per program of the long-row kernels
ROW_WARPS = 8  # warps of a one-program row kernel over 4,096 columns or more (e2e/micro_top.py sweeps it)


def applies(pool, kc: int, span: int) -> bool:
    return pool.fused and kc <= span


if triton is not None:

    @triton.jit
    def _one_row_kernel(logit_ptr, stored_ptr, n_ptr, limit_ptr, idx_ptr, score_ptr, chunk_ptr, nchunk, heads, m, st_slot,
                 st_head, scale, G: tl.constexpr, KC: tl.constexpr, BLOCK: tl.constexpr, FLAGS: tl.constexpr,
                 CH: tl.constexpr):
        # Program pid: slot pid // heads, KV head pid % heads; its logits are rows [pid * G, (pid + 1) * G) of m.
        # Which columns hold a token: stored flags (FLAGS), else a reserve's positions (stored_ptr: rpos, -1
        # empty) below the slot's n. It takes the slot's best K = limit picks and writes them first, in column
        # order; picks [K, KC) are empty.
        pid = tl.program_id(0)
        s = pid // heads
        K = tl.minimum(tl.minimum(tl.load(limit_ptr + s), KC), m)
        i = tl.arange(0, BLOCK)
        if FLAGS:
            stored = tl.load(stored_ptr + s * st_slot + (pid % heads) * st_head + i, mask=i < m, other=0) != 0
        else:
            rp = tl.load(stored_ptr + s * st_slot + i, mask=i < m, other=-1)
            stored = (i < m) & (i < tl.load(n_ptr + s)) & (rp >= 0)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for g in tl.static_range(G):
            x = tl.load(logit_ptr + (pid * G + g).to(tl.int64) * m + i, mask=stored, other=float("-inf")) * scale
            top = tl.max(x, 0)
            top = tl.where(top == float("-inf"), 0.0, top)  # a row with nothing stored stays -inf, not NaN
            best = tl.maximum(best, x - (top + tl.log(tl.sum(tl.exp(x - top), 0))))
        best = tl.where(stored, best, float("-inf"))
        # Integer keys ordered like the floats (negative floats' magnitude bits flipped); columns past the
        # row rank below -inf. Bisection over the keys (measured faster than four 8-bit radix passes here,
        # e2e/micro_top.py, H100) keeps at least K keys >= lo. It starts from the row's smallest finite key (when
        # K of them are finite) and its largest, not the whole 32-bit range, and stops once exactly K keys are
        # >= lo: those are the K best, with no tie across the cut, so the picks are the same as at the largest
        # such lo. Scores spread over a few units of log-probability leave about 15 of the 32 rounds.
        bits = best.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        key = tl.where(i < m, key, -(1 << 31))
        finite = best > float("-inf")
        nfin = tl.sum(finite.to(tl.int32), 0)
        lo = tl.where(nfin >= K, tl.min(tl.where(finite, key, (1 << 31) - 1), 0), -(1 << 31))
        hi = tl.max(key, 0)
        done = (tl.where(nfin >= K, nfin, BLOCK) == K).to(tl.int32)  # keys >= lo: the finite ones, or all
        while (lo < hi) & (done == 0):
            mid = (lo + hi + 1) // 2
            count = tl.sum((key >= mid).to(tl.int32), 0)
            ok = count >= K
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
            done = (count == K).to(tl.int32)
        above = key > lo
        tied = key == lo
        # All keys above the threshold, then tied ones in column order until K are taken.
        take = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= K - tl.sum(above.to(tl.int32), 0)))
        at = pid * KC + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(idx_ptr + at, _index(i, take, pid, chunk_ptr, nchunk, CH), mask=take)
        tl.store(score_ptr + at, best, mask=take)
        empty = (i >= K) & (i < KC)
        tl.store(idx_ptr + pid * KC + i, tl.zeros([BLOCK], tl.int64), mask=empty)
        tl.store(score_ptr + pid * KC + i, tl.full([BLOCK], float("-inf"), tl.float32), mask=empty)

    @triton.jit
    def _index(i, take, pid, chunk_ptr, nchunk, CH: tl.constexpr):
        # A pick's column, or with CH (stage two) its reserve index: candidate i is token i % CH of chunk
        # chunk_ptr[row, i // CH], the row's nchunk chunks.
        if CH == 0:
            return i.to(tl.int64)
        return tl.load(chunk_ptr + pid * nchunk + i // CH, mask=take, other=0).to(tl.int64) * CH + i % CH

    @triton.jit
    def _lse_parts(logit_ptr, stored_ptr, part_ptr, heads, m, nblk, st_slot, st_head, scale,
                   G: tl.constexpr, BLOCK: tl.constexpr):
        # Program (row, blk): row = slot * heads + head, columns [blk * BLOCK, (blk + 1) * BLOCK). Per query
        # head, the block's largest scaled logit and the sum of exp(logit - largest) over stored columns.
        pid, blk = tl.program_id(0), tl.program_id(1)
        i = blk * BLOCK + tl.arange(0, BLOCK)
        ok = tl.load(stored_ptr + (pid // heads) * st_slot + (pid % heads) * st_head + i, mask=i < m, other=0) != 0
        for g in tl.static_range(G):
            x = tl.load(logit_ptr + (pid * G + g).to(tl.int64) * m + i, mask=ok, other=float("-inf")) * scale
            top = tl.max(x, 0)
            total = tl.sum(tl.exp(x - tl.where(top == float("-inf"), 0.0, top)), 0)
            at = ((pid * nblk + blk) * G + g) * 2
            tl.store(part_ptr + at, top)
            tl.store(part_ptr + at + 1, total)

    @triton.jit
    def _keys(logit_ptr, stored_ptr, part_ptr, key_ptr, hist_ptr, heads, m, nblk, st_slot, st_head, scale,
              G: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
        # Each column's group score (the query heads' best log-softmax) as an integer key ordered like it,
        # and the first radix pass's histogram of the keys' top 8 bits.
        pid, blk = tl.program_id(0), tl.program_id(1)
        i = blk * BLOCK + tl.arange(0, BLOCK)
        ok = tl.load(stored_ptr + (pid // heads) * st_slot + (pid % heads) * st_head + i, mask=i < m, other=0) != 0
        p = tl.arange(0, NB)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for g in tl.static_range(G):
            at = ((pid * nblk + p) * G + g) * 2
            top = tl.load(part_ptr + at, mask=p < nblk, other=float("-inf"))
            total = tl.load(part_ptr + at + 1, mask=p < nblk, other=0.0)
            big = tl.max(top, 0)
            big = tl.where(big == float("-inf"), 0.0, big)
            lse = big + tl.log(tl.sum(total * tl.exp(top - big), 0))
            x = tl.load(logit_ptr + (pid * G + g).to(tl.int64) * m + i, mask=ok, other=float("-inf")) * scale
            best = tl.maximum(best, x - lse)
        bits = tl.where(ok, best, float("-inf")).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        tl.store(key_ptr + pid.to(tl.int64) * m + i, key, mask=i < m)
        digits = ((key.to(tl.int64) + (1 << 31)) >> 24).to(tl.int32)
        tl.atomic_add(hist_ptr + pid * 256 + tl.arange(0, 256), tl.histogram(digits, 256, mask=i < m))

    @triton.jit
    def _threshold(hist_ptr, pid, rows, P: tl.constexpr, K):
        # Radix select over the histograms of passes [0, P): the K-th best key lies in [lo, lo + 2^(32 - 8P))
        # and `above` keys lie above that range. Every program recomputes it (P loads of 256 counts).
        d = tl.arange(0, 256)
        lo = tl.full([], -(1 << 31), tl.int64)
        above = tl.full([], 0, tl.int32)
        for p in tl.static_range(P):
            counts = tl.load(hist_ptr + (p * rows + pid) * 256 + d)
            at_or_above = above + tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts  # keys >= each digit's start
            digit = tl.sum((at_or_above >= K).to(tl.int32), 0) - 1
            above += tl.sum(tl.where(d > digit, counts, 0), 0)
            lo += digit.to(tl.int64) << (24 - 8 * p)
        return lo, above

    @triton.jit
    def _radix(key_ptr, hist_ptr, block_ptr, limit_ptr, heads, rows, m, nblk, P: tl.constexpr, KC: tl.constexpr,
               BLOCK: tl.constexpr):
        # Pass P's histogram of the next 8 bits of the keys inside the range, one block per program. The last
        # pass also keeps each block's own histogram and count of keys above the range (for _compact).
        pid, blk = tl.program_id(0), tl.program_id(1)
        lo, _ = _threshold(hist_ptr, pid, rows, P, tl.minimum(tl.load(limit_ptr + pid // heads), KC))
        i = blk * BLOCK + tl.arange(0, BLOCK)
        digits = (tl.load(key_ptr + pid.to(tl.int64) * m + i, mask=i < m, other=0).to(tl.int64) - lo) >> (24 - 8 * P)
        inside = (i < m) & (digits >= 0) & (digits < 256)
        counts = tl.histogram(tl.where(inside, digits, 0).to(tl.int32), 256, mask=inside)
        tl.atomic_add(hist_ptr + (P * rows + pid) * 256 + tl.arange(0, 256), counts)
        if P == 3:
            at = (pid * nblk + blk) * 257
            tl.store(block_ptr + at + tl.arange(0, 256), counts)
            tl.store(block_ptr + at + 256, tl.sum(((i < m) & (digits >= 256)).to(tl.int32), 0))

    @triton.jit
    def _compact(key_ptr, hist_ptr, block_ptr, limit_ptr, idx_ptr, score_ptr, chunk_ptr, nchunk, heads, rows, m, nblk,
                 KC: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr):
        # All keys above the K-th best, then tied ones in column order until K are taken (K: the row's limit);
        # the blocks before this one took their own keys above it and the first of the tied ones (from their
        # last-pass counts).
        pid, blk = tl.program_id(0), tl.program_id(1)
        k = tl.minimum(tl.load(limit_ptr + pid // heads), KC)
        kth, above = _threshold(hist_ptr, pid, rows, 4, k)
        need = k - above
        digit = (kth - _threshold(hist_ptr, pid, rows, 3, k)[0]).to(tl.int32)
        p, d = tl.arange(0, NB), tl.arange(0, 256)
        before = p < blk
        counts = tl.load(block_ptr + (pid * nblk + p[:, None]) * 257 + d[None, :], mask=before[:, None], other=0)
        above_before = tl.sum(tl.load(block_ptr + (pid * nblk + p) * 257 + 256, mask=before, other=0), 0)
        above_before += tl.sum(tl.sum(tl.where(d[None, :] > digit, counts, 0), 1), 0)
        tied_before = tl.sum(tl.sum(tl.where(d[None, :] == digit, counts, 0), 1), 0)
        i = blk * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(key_ptr + pid.to(tl.int64) * m + i, mask=i < m, other=0)
        tied = (i < m) & (key.to(tl.int64) == kth)
        take = (i < m) & ((key.to(tl.int64) > kth) | (tied & (tied_before + tl.cumsum(tied.to(tl.int32), 0) <= need)))
        at = pid * KC + above_before + tl.minimum(tied_before, need) + tl.cumsum(take.to(tl.int32), 0) - 1
        bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
        tl.store(idx_ptr + at, _index(i, take, pid, chunk_ptr, nchunk, CH), mask=take)
        tl.store(score_ptr + at, bits.to(tl.float32, bitcast=True), mask=take)


def group_top(logits: torch.Tensor, rpos: torch.Tensor, n: torch.Tensor, kc: int, scale: float,
              limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, kv_heads, group, m] float32 (q.k unscaled), rpos [b, >= m] (reserve positions, -1: empty),
    n [b] tokens stored -> (indices, scores) [b, kv_heads, kc] of the kc best by group_scores; given `limit`
    [b] in [1, kc], each slot's best `limit` first, then empty picks (score -inf). Picks come in reserve order
    from rows of up to SPAN_LIMIT tokens, else as stored_top gives them."""
    b, heads, group, m = logits.shape
    if m > SPAN_LIMIT:
        index = torch.arange(m, device=logits.device)
        return stored_top(logits, ((index < n.view(-1, 1)) & (rpos[:, :m] >= 0)).unsqueeze(1), kc, scale, limit)
    limit = torch.full((b,), kc, dtype=torch.long, device=logits.device) if limit is None else limit
    return _one_row(logits, rpos, n, (rpos.stride(0), 0), kc, scale, limit)


def _one_row(logits: torch.Tensor, stored: torch.Tensor, n: torch.Tensor | None, strides: tuple[int, int], kc: int,
             scale: float, limit: torch.Tensor, chunks: torch.Tensor | None = None, chunk: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    # One program per row (_one_row): stored flags as uint8 with their (slot, head) strides, or (n given) the
    # reserve's positions rpos with the slots' n.
    b, heads, group, m = logits.shape
    idx = torch.empty(b, heads, kc, dtype=torch.long, device=logits.device)
    score = torch.empty(b, heads, kc, dtype=torch.float32, device=logits.device)
    block = max(triton.next_power_of_2(max(m, kc)), 16)
    ch = (chunks.contiguous(), chunks.shape[2]) if chunks is not None else (logits, 0)  # unread without chunks
    _one_row_kernel[(b * heads,)](logits.contiguous(), stored, stored if n is None else n, limit, idx, score, *ch,
                                  heads, m, *strides, scale, G=group, KC=kc, BLOCK=block, FLAGS=n is None,
                                  CH=chunk if chunks is not None else 0,
                                  num_warps=ROW_WARPS if block >= 4096 else 4)
    return idx, score


def stored_top(logits: torch.Tensor, stored: torch.Tensor, kc: int, scale: float,
               limit: torch.Tensor | None = None, chunks: torch.Tensor | None = None, chunk: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The long-row kernels: logits [b, kv_heads, group, m] float32 (q.k unscaled), stored [b, 1 or kv_heads,
    m] bool -> (columns, scores) [b, kv_heads, kc] of the kc best by group_scores (-inf: not stored), best
    first (equal scores in column order).

    limit [b] in [1, kc]: each slot's picks are its best `limit` in column order, then empty ones (score
    -inf) up to kc, never sorted: cache/fused.py keeps a slot's first `middle` picks in any order, so a
    slot's middle as its limit makes sorting the picks unnecessary.

    chunks [b, kv_heads, m // chunk] (stage two): column i stands for token i % chunk of chunk chunks[..., i //
    chunk], and the picks are those reserve indices instead of columns."""
    b, heads, group, m = logits.shape
    limited = limit is not None
    limit = limit if limited else torch.full((b,), kc, dtype=torch.long, device=logits.device)
    logits, flags = logits.contiguous(), stored.view(torch.uint8)
    strides = (flags.stride(0), flags.stride(1) if flags.shape[1] > 1 else 0)
    if m <= SPAN_LIMIT:
        return _ordered(*_one_row(logits, flags, None, strides, kc, scale, limit, chunks, chunk), limited)
    ch = (chunks.contiguous(), chunks.shape[2]) if chunks is not None else (logits, 0)  # unread without chunks
    ch_size = chunk if chunks is not None else 0
    rows, nblk = b * heads, triton.cdiv(m, BLOCK)
    parts = torch.empty(rows, nblk, group, 2, dtype=torch.float32, device=logits.device)
    keys = torch.empty(rows, m, dtype=torch.int32, device=logits.device)
    idx = torch.zeros(b, heads, kc, dtype=torch.long, device=logits.device)
    score = torch.full((b, heads, kc), float("-inf"), dtype=torch.float32, device=logits.device)
    _lse_parts[(rows, nblk)](logits, flags, parts, heads, m, nblk, *strides, scale, G=group, BLOCK=BLOCK, num_warps=8)
    nb = max(triton.next_power_of_2(nblk), 2)
    hist = torch.zeros(4, rows, 256, dtype=torch.int32, device=logits.device)
    _keys[(rows, nblk)](logits, flags, parts, keys, hist, heads, m, nblk, *strides, scale, G=group, BLOCK=BLOCK,
                        NB=nb, num_warps=8)
    blocks = torch.empty(rows, nblk, 257, dtype=torch.int32, device=logits.device)
    for p in range(1, 4):
        _radix[(rows, nblk)](keys, hist, blocks, limit, heads, rows, m, nblk, P=p, KC=kc, BLOCK=BLOCK, num_warps=8)
    _compact[(rows, nblk)](keys, hist, blocks, limit, idx, score, *ch, heads, rows, m, nblk, KC=kc, BLOCK=BLOCK, NB=nb,
                           CH=ch_size, num_warps=8)
    return _ordered(idx, score, limited)


def _ordered(idx: torch.Tensor, score: torch.Tensor, limited: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Picks come in column order; without a limit they go best first (stored_top's contract).
    if limited:
        return idx, score
    score, order = score.sort(dim=-1, descending=True, stable=True)
    return idx.gather(-1, order), score
