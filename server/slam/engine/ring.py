"""The ring write of a decode step as one Triton kernel (GPUs) or C++ op (CPUs, cache/cpu_writes.cpp): each
slot's column `write` gives up the token it held (the evicted one, returned to the policies) and takes the new
token. The eager version reads and writes keys, values, positions and scores with eight indexing ops per
layer; model_runner.py uses this one when the engine's `compile` setting is on and Triton is installed (GPUs)
or the C++ ops built (CPUs)."""

from __future__ import annotations

import torch

from slam.cache import cpu_kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the eager indexing does the same work
    triton = None


def available(device: torch.device) -> bool:
    if device.type == "cpu":
        return cpu_kernels.available()
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _ring(k_ptr, v_ptr, pos_ptr, score_ptr, kn_ptr, vn_ptr, write_ptr, newpos_ptr, active_ptr,
              ek_ptr, ev_ptr, epos_ptr, escore_ptr, heads, cols, D: tl.constexpr):
        # One program: slot s, KV head h (pid = s * heads + h); pool column c of it starts at (pid * cols + c) * D.
        pid = tl.program_id(0)
        s = pid // heads
        at = pid * cols + tl.load(write_ptr + s)
        d = tl.arange(0, D)
        tl.store(ek_ptr + pid * D + d, tl.load(k_ptr + at * D + d))
        tl.store(ev_ptr + pid * D + d, tl.load(v_ptr + at * D + d))
        tl.store(epos_ptr + pid, tl.load(pos_ptr + at))
        tl.store(escore_ptr + pid, tl.load(score_ptr + at))
        tl.debug_barrier()  # the old token is copied out before the new one lands
        tl.store(k_ptr + at * D + d, tl.load(kn_ptr + pid * D + d))
        tl.store(v_ptr + at * D + d, tl.load(vn_ptr + pid * D + d))
        tl.store(pos_ptr + at, tl.where(tl.load(active_ptr + s) != 0, tl.load(newpos_ptr + s), -1))
        tl.store(score_ptr + at, 0.0)


def ring_write(pool, layer: int, write: torch.Tensor, pos: torch.Tensor, active: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots [0, b) trade the token in column write [b] for new keys and values k, v [b, kv_heads, head_dim] at
    positions pos [b] (-1 where not active). Returns what the columns held: keys and values [b, kv_heads,
    head_dim], positions [b, kv_heads], scores [b, kv_heads] (float32)."""
    if k.device.type == "cpu":
        return torch.ops.slam_cpu.ring_write(pool.k[layer], pool.v[layer], pool.pos[layer], pool.score[layer], write,
                                             pos, active, k, v)
    return kernel_ring_write(pool, layer, write, pos, active, k, v)


def kernel_ring_write(pool, layer: int, write: torch.Tensor, pos: torch.Tensor, active: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ring_write by the Triton kernel (GPUs; CPUs under Triton's interpreter in tests/fused_check.py)."""
    b, heads, d = k.shape
    ek, ev = torch.empty_like(k), torch.empty_like(v)
    epos = torch.empty(b, heads, dtype=torch.long, device=k.device)
    escore = torch.empty(b, heads, dtype=torch.float32, device=k.device)
    _ring[(b * heads,)](pool.k[layer], pool.v[layer], pool.pos[layer], pool.score[layer], k.contiguous(),
                        v.contiguous(), write, pos, active, ek, ev, epos, escore, heads, pool.budget + 1, D=d)
    return ek, ev, epos, escore
