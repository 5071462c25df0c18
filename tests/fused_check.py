"""The Triton kernels of the decode step against the eager code they replace, on one random pool: slam's
placement of chosen tokens (cache/fused.py against cache/slam.py place: same columns, positions, reserve
indices and churn) and the ring write (engine/ring.py). Runs on a CUDA device, or on the CPU
under Triton's interpreter (`TRITON_INTERPRET=1 python tests/fused_check.py`); e2e/gpu_checks.py and
tests/test_fused_place.py call it.
"""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import torch

from slam.cache import fused, fused_top
from slam.cache.selection import dot_float, exact_top
from slam.cache.slam import place
from slam.engine import ring
from slam.engine.pool import SlotPool


@torch.inference_mode()
def random_pool(device: str, dtype: torch.dtype, seed: int, kc: int = 24) -> tuple[SlotPool, SimpleNamespace, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    slots, heads, budget, d, layers = 5, 3, kc + 16, 16, 2
    pool = SlotPool(layers, slots, heads, budget, d, dtype, torch.device(device))
    pool.ensure_reserve(12 * kc)
    n = pool.cap
    for layer in range(layers):
        pool.rk[layer].copy_(torch.randn(pool.rk[layer].shape, generator=g).to(dtype))
        pool.rv[layer].copy_(torch.randn(pool.rv[layer].shape, generator=g).to(dtype))
        pool.k[layer].copy_(torch.randn(pool.k[layer].shape, generator=g).to(dtype))
        pool.v[layer].copy_(torch.randn(pool.v[layer].shape, generator=g).to(dtype))
        # Some middle columns already hold reserve tokens that the new choice will keep, some not.
        pool.ridx[layer].copy_(torch.randint(-1, 3 * kc, pool.ridx[layer].shape, generator=g))
        pool.pos[layer].copy_(torch.randint(-1, 500, pool.pos[layer].shape, generator=g))
    pool.rpos[:, :n] = torch.arange(n).expand(slots, -1) + 4
    b = 4
    sink = torch.tensor([4, 2, 4, 0])
    middle = torch.tensor([kc, kc // 2, kc, kc])
    mine = torch.tensor([True, True, False, True])
    idx = torch.stack([torch.randperm(3 * kc, generator=g)[:kc] for _ in range(b * heads)]).view(b, heads, kc)
    score = torch.randn(b, heads, kc, generator=g)
    score[0, 1, 5:9] = float("-inf")  # nothing found for these picks
    # once(): StepPlan's per-step memo, here computing afresh at every call.
    plan = SimpleNamespace(sink=sink.to(device), middle=middle.to(device), once=lambda _key, make: make())
    return pool, plan, idx.to(device), score.to(device), mine.to(device)


@torch.inference_mode()
def compare(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, kc: int = 24) -> None:
    """The eager placement takes the picks best first (as sorted top-k gives them), the kernel in any order
    (as unsorted top-k gives them on GPUs): both must fill the same columns alike."""
    pool, plan, idx, score, mine = random_pool(device, dtype, seed, kc)
    score, order = score.sort(dim=-1, descending=True)
    idx = idx.gather(2, order)
    shuffle = torch.randperm(idx.shape[2], generator=torch.Generator().manual_seed(seed)).to(device)
    if not fused.ranks_itself(kc):  # many picks reach the kernel best first, as sorted top-k leaves them
        shuffle = torch.arange(idx.shape[2], device=device)
    eager = copy.deepcopy(pool)
    for layer in range(pool.layers):
        place(eager, layer, plan, idx, score, mine)
        fused.place(pool, layer, plan, idx[:, :, shuffle], score[:, :, shuffle], mine)
    cols = slice(0, pool.budget)  # the eager path also writes the scratch column; nothing reads it
    for layer in range(pool.layers):
        for name in ("pos", "ridx"):
            a, b = getattr(eager, name)[layer][:, :, cols], getattr(pool, name)[layer][:, :, cols]
            assert torch.equal(a, b), f"{name}[{layer}] differs at {(a != b).nonzero()[:5].tolist()}"
        held = (eager.pos[layer][:, :, cols] >= 0).unsqueeze(-1)  # columns holding nothing may hold any bytes
        for name in ("k", "v"):
            a, b = getattr(eager, name)[layer][:, :, cols], getattr(pool, name)[layer][:, :, cols]
            assert torch.equal(a * held, b * held), f"{name}[{layer}] differs"
    assert torch.equal(eager.replaced, pool.replaced), (eager.replaced.tolist(), pool.replaced.tolist())
    assert int(pool.replaced.sum()) > 0 and int((pool.replaced == 0).sum()) >= 1  # slot 2 is not slam's


@torch.inference_mode()
def compare_ring(device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
    """engine/ring.py's kernel against the eager indexing it replaces (model_runner.ring_write)."""
    pool = random_pool(device, dtype, seed)[0]
    g = torch.Generator().manual_seed(seed + 1)
    for layer in range(pool.layers):
        pool.score[layer].copy_(torch.rand(pool.score[layer].shape, generator=g))
    b, heads, d = 4, pool.kv_heads, pool.head_dim
    write = torch.tensor([7, 39, pool.budget, 12], device=device)  # slot 2 is idle: its scratch column
    pos = torch.tensor([100, 101, 0, 102], device=device)
    active = torch.tensor([True, True, False, True], device=device)
    k, v = (torch.randn(b, heads, d, generator=g).to(device, dtype) for _ in range(2))
    eager = copy.deepcopy(pool)
    ar = torch.arange(b, device=device)
    for layer in range(pool.layers):
        ek, ev, epos, escore = ring.ring_write(pool, layer, write, pos, active, k, v)
        assert torch.equal(ek, eager.k[layer][ar, :, write]) and torch.equal(ev, eager.v[layer][ar, :, write])
        assert torch.equal(epos, eager.pos[layer][ar, :, write])
        assert torch.equal(escore, eager.score[layer][ar, :, write])
        eager.k[layer][ar, :, write], eager.v[layer][ar, :, write] = k, v
        eager.pos[layer][ar, :, write] = torch.where(active, pos, -1).unsqueeze(1)
        eager.score[layer][ar, :, write] = 0.0
        for name in ("k", "v", "pos", "score"):
            assert torch.equal(getattr(eager, name)[layer], getattr(pool, name)[layer]), name


@torch.inference_mode()
def compare_top(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, kc: int = 24, m: int = 300,
                group: int = 3) -> None:
    """cache/fused_top.py's kernel against group_scores + torch.topk (selection.exact_top): the same picks
    where the scores are apart, the same scores, and a reserve with holes, part-filled slots and a slot
    holding fewer tokens than kc."""
    g = torch.Generator().manual_seed(seed)
    b, heads, d = 4, 2, 16
    q = torch.randn(b, heads, group, d, generator=g).to(device, dtype)
    keys = torch.randn(b, heads, m, d, generator=g).to(device, dtype)
    rpos = torch.arange(m + 1).repeat(b, 1)
    rpos[1, 5:40] = -1  # tokens not stored (holes)
    rpos[:, m] = -1
    n = torch.tensor([m, m - 7, kc // 2, m // 2])  # slot 2 holds fewer than kc
    rpos, n, scale = rpos.to(device), n.to(device), d**-0.5
    want_idx, want = exact_top(dot_float(q, keys), rpos[:, :m], n, kc, scale)
    idx, score = fused_top.group_top(dot_float(q, keys), rpos, n, kc, scale)
    found = score > float("-inf")
    assert torch.equal(found.sum(-1), (want > float("-inf")).sum(-1)), "different numbers of picks found"
    # Each found pick is one of the kc best up to rounding (the two compute the log-softmax differently).
    eager = torch.full((b, heads, m), float("-inf"), device=device).scatter(2, want_idx, want)
    kth = want.min(dim=-1, keepdim=True).values
    assert bool(((eager.gather(2, idx) >= kth - 1e-4) | ~found).all()), "a pick outside the kc best"
    assert torch.allclose(torch.where(found, eager.gather(2, idx), 0), torch.where(found, score, 0), atol=1e-4)
    assert all(len(set(row)) == kc for row in idx.flatten(0, 1).tolist()), "a pick taken twice"


if __name__ == "__main__":
    compare(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    compare(sys.argv[1] if len(sys.argv) > 1 else "cpu", kc=150)  # several programs per slot and head
    compare(sys.argv[1] if len(sys.argv) > 1 else "cpu", kc=300)  # picks sorted, churn counted outside
    compare_ring(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    compare_top(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    compare_top(sys.argv[1] if len(sys.argv) > 1 else "cpu", kc=188, m=3936, group=4)
    print("fused placement, ring write and group top-k equal their eager versions")
