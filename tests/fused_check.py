"""The fused Triton placement of chosen tokens (cache/fused.py) against the eager one (cache/slam.py place),
on one random pool: same columns, positions, reserve indices and churn. Runs on a CUDA device, or on the CPU
under Triton's interpreter (`TRITON_INTERPRET=1 python tests/fused_check.py`); e2e/gpu_checks.py and
tests/test_fused_place.py call it.
"""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import torch

from slam.cache import fused
from slam.cache.slam import place
from slam.engine.pool import SlotPool


@torch.inference_mode()
def random_pool(device: str, dtype: torch.dtype, seed: int) -> tuple[SlotPool, SimpleNamespace, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    slots, heads, budget, d, layers = 5, 3, 40, 16, 2
    pool = SlotPool(layers, slots, heads, budget, d, dtype, torch.device(device))
    pool.ensure_reserve(300)
    n = pool.cap
    for layer in range(layers):
        pool.rk[layer].copy_(torch.randn(pool.rk[layer].shape, generator=g).to(dtype))
        pool.rv[layer].copy_(torch.randn(pool.rv[layer].shape, generator=g).to(dtype))
        pool.k[layer].copy_(torch.randn(pool.k[layer].shape, generator=g).to(dtype))
        pool.v[layer].copy_(torch.randn(pool.v[layer].shape, generator=g).to(dtype))
        # Some middle columns already hold reserve tokens that the new choice will keep, some not.
        pool.ridx[layer].copy_(torch.randint(-1, 60, pool.ridx[layer].shape, generator=g))
        pool.pos[layer].copy_(torch.randint(-1, 500, pool.pos[layer].shape, generator=g))
    pool.rpos[:, :n] = torch.arange(n).expand(slots, -1) + 4
    b, kc = 4, 24
    sink = torch.tensor([4, 2, 4, 0])
    middle = torch.tensor([24, 10, 24, 24])
    mine = torch.tensor([True, True, False, True])
    idx = torch.stack([torch.randperm(60, generator=g)[:kc] for _ in range(b * heads)]).view(b, heads, kc)
    score = torch.randn(b, heads, kc, generator=g)
    score[0, 1, 5:9] = float("-inf")  # nothing found for these picks
    plan = SimpleNamespace(sink=sink.to(device), middle=middle.to(device))
    return pool, plan, idx.to(device), score.to(device), mine.to(device)


@torch.inference_mode()
def compare(device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
    pool, plan, idx, score, mine = random_pool(device, dtype, seed)
    eager = copy.deepcopy(pool)
    for layer in range(pool.layers):
        place(eager, layer, plan, idx, score, mine)
        fused.place(pool, layer, plan, idx, score, mine)
    cols = slice(0, pool.budget)  # the eager path also writes the scratch column; nothing reads it
    for name in ("k", "v", "pos", "ridx"):
        for layer in range(pool.layers):
            a, b = getattr(eager, name)[layer][:, :, cols], getattr(pool, name)[layer][:, :, cols]
            assert torch.equal(a, b), f"{name}[{layer}] differs at {(a != b).nonzero()[:5].tolist()}"
    assert torch.equal(eager.replaced, pool.replaced), (eager.replaced.tolist(), pool.replaced.tolist())
    assert int(pool.replaced.sum()) > 0 and int((pool.replaced == 0).sum()) >= 1  # slot 2 is not slam's


if __name__ == "__main__":
    compare(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print("fused placement equals eager placement")
