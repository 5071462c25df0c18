"""Decode attention over the slot pool as flash decoding in two Triton kernels (GPUs).

With one query per head, torch's SDPA (cuDNN's flash kernel on the H100) tiles the queries by 64 or more:
at batch 32 and budget 2048 it took 45 us per layer, three times the time its keys and values take to read,
and 44% of a `streaming` step. Here a program takes one KV head of one slot, the head's query group (on the
tensor cores) and one block of pool columns, and leaves that block's softmax parts; a second kernel merges
each query head's parts. Each slot is computed on its own, so its output does not depend on the rest of the
batch. model_runner.py uses it where the engine's `compile` setting is on and Triton is installed;
tests/fused_check.py holds it to SDPA.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: SDPA
    triton = None

COLUMNS = 128  # pool columns per program
WARPS = 4  # warps per program (e2e/micro_kernels.py sweeps both)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _parts(q_ptr, k_ptr, v_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr, cols, nblk, scale, G: tl.constexpr,
               GP: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):
        # Program (row, blk): row = slot * kv_heads + head, columns [blk * BC, (blk + 1) * BC) of it.
        pid, blk = tl.program_id(0), tl.program_id(1)
        c = blk * BC + tl.arange(0, BC)
        valid = tl.load(valid_ptr + pid * cols + c, mask=c < cols, other=0) != 0
        g, d = tl.arange(0, GP), tl.arange(0, D)
        q = tl.load(q_ptr + (pid * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)  # [GP, D]
        at = (pid * cols + c[:, None]).to(tl.int64) * D + d[None, :]
        k = tl.load(k_ptr + at, mask=c[:, None] < cols, other=0.0)  # [BC, D]
        v = tl.load(v_ptr + at, mask=c[:, None] < cols, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # [GP, BC] float32
        m = tl.max(s, 1)
        p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
        if IEEE:
            acc = tl.dot(p, v, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v)  # [GP, D] float32, the probabilities rounded like flash attention's
        part = (pid * nblk + blk) * G + g
        tl.store(m_ptr + part, m, mask=g < G)
        tl.store(l_ptr + part, tl.sum(p, 1), mask=g < G)
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g[:, None] < G)

    @triton.jit
    def _merge(m_ptr, l_ptr, acc_ptr, out_ptr, nblk, G: tl.constexpr, D: tl.constexpr, NB: tl.constexpr):
        # Program qh = (slot * kv_heads + head) * G + g: query head g of the group, its parts across blocks.
        qh = tl.program_id(0)
        row, g = qh // G, qh % G
        blk, d = tl.arange(0, NB), tl.arange(0, D)
        part = (row * nblk + blk) * G + g
        m = tl.load(m_ptr + part, mask=blk < nblk, other=float("-inf"))
        top = tl.max(m, 0)
        w = tl.exp(m - top)  # 0 for blocks without a valid column
        total = tl.sum(w * tl.load(l_ptr + part, mask=blk < nblk, other=0.0), 0)
        acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=blk[:, None] < nblk, other=0.0)
        out = tl.sum(acc * w[:, None], 0) / total
        tl.store(out_ptr + qh * D + d, out.to(out_ptr.dtype.element_ty))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """attention.attend for one query per head: q [b, H*G, 1, D]; k, v [b, H, C, D]; valid [b, H, 1, C] bool
    (every row with a valid column) -> [b, H*G, 1, D]."""
    b, heads, cols, d = k.shape
    q = q.to(k.dtype)
    group = q.shape[1] // heads
    rows, nblk = b * heads, triton.cdiv(cols, COLUMNS)
    m = torch.empty(rows, nblk, group, dtype=torch.float32, device=q.device)
    total = torch.empty_like(m)
    acc = torch.empty(rows, nblk, group, d, dtype=torch.float32, device=q.device)
    out = torch.empty(b, heads * group, 1, d, dtype=q.dtype, device=q.device)
    _parts[(rows, nblk)](q.contiguous(), k.contiguous(), v.contiguous(), valid.contiguous().view(torch.uint8), m,
                         total, acc, cols, nblk, scale, G=group, GP=max(16, triton.next_power_of_2(group)), D=d,
                         BC=COLUMNS, IEEE=q.dtype == torch.float32, num_warps=WARPS)
    _merge[(rows * group,)](m, total, acc, out, nblk, G=group, D=d, NB=max(triton.next_power_of_2(nblk), 2),
                            num_warps=4)
    return out
