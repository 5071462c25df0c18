"""The decode step's writing kernels against the eager code they replace, on random pools (tests/fused_check.py
runs them): slam's placement of chosen tokens (cache/fused.py against cache/slam.py place), the evicted token's
append with its chunk bounds (engine/append.py) and the ring write (engine/ring.py); and the random pools the
other checks share.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from slam.cache import fused
from slam.cache.slam import place
from slam.engine import append, ring
from slam.engine.pool import SlotPool


def fill_reserve(pool: SlotPool, layer: int, g: torch.Generator) -> None:
    """Random reserve keys and values: int8 with float32 scales per token where the reserve is int8."""
    for store, scales in ((pool.rk, pool.rk_scale), (pool.rv, pool.rv_scale)):
        shape = store[layer].shape
        if pool.reserve_int8:
            store[layer].copy_(torch.randint(-127, 128, shape, generator=g, dtype=torch.int8))
            scales[layer].copy_(torch.rand(shape[:3], generator=g) * 0.02 + 0.01)
        else:
            store[layer].copy_(torch.randn(shape, generator=g).to(store[layer].dtype))


def hold_reserve_tokens(pool: SlotPool, layer: int, m: int, g: torch.Generator) -> None:
    """Columns that hold distinct reserve tokens of [0, m), as a running pool's middle does (with their rows,
    dequantized, and positions), or nothing (-1): some the new choice keeps, some not."""
    slots, heads, cols = pool.ridx[layer].shape
    ridx = torch.stack([torch.randperm(m, generator=g)[:cols] for _ in range(slots * heads)]).view(slots, heads, cols)
    ridx[torch.rand(ridx.shape, generator=g) < 0.2] = -1
    ridx = ridx.to(pool.device)
    pool.ridx[layer].copy_(ridx)
    held = (ridx >= 0).unsqueeze(-1)
    at = ridx.clamp_min(0)
    rows = pool.reserve_rows(at)
    for name in ("k", "v"):
        store = getattr(pool, name)[layer]
        store.copy_(torch.where(held, pool.reserve_gather(layer, at, name, rows), store))
    pool.pos[layer].copy_(torch.where(ridx >= 0, pool.rpos.gather(1, at.flatten(1)).view_as(at), pool.pos[layer]))


def same_tokens(a: SlotPool, b: SlotPool, layer: int) -> None:
    """Each (slot, KV head) of the two pools holds the same tokens in columns [0, budget): reserve indices,
    positions, keys and values, in whatever columns (attention does not depend on their order)."""
    cols = slice(0, a.budget)  # the eager path may also write the scratch column; nothing reads it
    keys = []
    for pool in (a, b):
        ridx, pos = pool.ridx[layer][:, :, cols], pool.pos[layer][:, :, cols]
        order = (ridx * 1_000_000 + pos).argsort(dim=-1, stable=True)
        held = (pos.gather(2, order) >= 0).unsqueeze(-1)
        rows = order.unsqueeze(-1).expand(-1, -1, -1, pool.head_dim)
        keys.append([ridx.gather(2, order), pos.gather(2, order)]
                    + [getattr(pool, name)[layer][:, :, cols].gather(2, rows) * held for name in ("k", "v")])
    for name, x, y in zip(("ridx", "pos", "k", "v"), *keys):
        assert torch.equal(x, y), f"{name}[{layer}] differs at {(x != y).nonzero()[:5].tolist()}"


@torch.inference_mode()
def random_pool(device: str, dtype: torch.dtype, seed: int, kc: int = 24, reserve_int8: bool = False
                ) -> tuple[SlotPool, SimpleNamespace, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    slots, heads, budget, d, layers = 5, 3, kc + 16, 16, 2
    pool = SlotPool(layers, slots, heads, budget, d, dtype, torch.device(device), reserve_int8=reserve_int8)
    pool.ensure_reserve(12 * kc)
    n = pool.cap
    for layer in range(layers):
        fill_reserve(pool, layer, g)
        pool.k[layer].copy_(torch.randn(pool.k[layer].shape, generator=g).to(dtype))
        pool.v[layer].copy_(torch.randn(pool.v[layer].shape, generator=g).to(dtype))
        pool.pos[layer].copy_(torch.randint(-1, 500, pool.pos[layer].shape, generator=g))
    pool.rpos[:, :n] = torch.arange(n).expand(slots, -1) + 4
    for layer in range(layers):
        hold_reserve_tokens(pool, layer, 3 * kc, g)
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


def same_columns(a: SlotPool, b: SlotPool, layer: int) -> None:
    """Each column of [0, budget) holds the same token in both pools: reserve index, position, and its key and
    value rows where it holds one (an emptied column's rows are not read)."""
    cols = slice(0, a.budget)
    for name in ("ridx", "pos"):
        x, y = getattr(a, name)[layer][:, :, cols], getattr(b, name)[layer][:, :, cols]
        assert torch.equal(x, y), f"{name}[{layer}] differs at {(x != y).nonzero()[:5].tolist()}"
    held = (a.pos[layer][:, :, cols] >= 0).unsqueeze(-1)
    for name in ("k", "v"):
        x, y = (getattr(p, name)[layer][:, :, cols] * held for p in (a, b))
        assert torch.equal(x, y), f"{name}[{layer}] differs at {(x != y).nonzero()[:5].tolist()}"


@torch.inference_mode()
def compare(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, kc: int = 24,
            reserve_int8: bool = False) -> None:
    """The kernels against place(): given the same picks, the same columns (a token chosen again keeps its
    column, newcomers take the freed ones in pick order; an int8 reserve's rows dequantized alike, bit for
    bit) and the same churn. Given each slot's best `middle` picks in another order, as the top-k kernels
    leave them, the same tokens in whatever columns."""
    pool, plan, idx, score, mine = random_pool(device, dtype, seed, kc, reserve_int8)
    score, order = score.sort(dim=-1, descending=True)
    idx = idx.gather(2, order)
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.cat([torch.randperm(m, generator=g), m + torch.randperm(kc - m, generator=g)])
                           for m in plan.middle.tolist()]).to(device)  # [b, kc], within each slot's best middle
    shuffle = shuffle.unsqueeze(1).expand_as(idx)
    eager, ordered = copy.deepcopy(pool), copy.deepcopy(pool)
    for layer in range(pool.layers):
        place(eager, layer, plan, idx, score, mine)
        fused.place(ordered, layer, plan, idx, score, mine)
        fused.place(pool, layer, plan, idx.gather(2, shuffle), score.gather(2, shuffle), mine)
    for layer in range(pool.layers):
        same_columns(eager, ordered, layer)
        same_tokens(eager, pool, layer)
        assert bool((pool.home == -1).all()), "the column map is not left empty"
    for p in (ordered, pool):
        assert torch.equal(eager.replaced, p.replaced), (eager.replaced.tolist(), p.replaced.tolist())
    assert int(pool.replaced.sum()) > 0 and int((pool.replaced == 0).sum()) >= 1  # slot 2 is not slam's
    kept = (eager.ridx[0] == pool.ridx[0]) & (pool.ridx[0] >= 0)
    assert int(kept.sum()) > 0, "no token chosen again kept its column"


@torch.inference_mode()
def compare_append(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, reserve_int8: bool = False,
                   d: int = 16) -> None:
    """engine/append.py's kernel against pool.reserve_append and pool.summarize_append: the same reserve rows
    (int8 rows and scales where the reserve is int8) and the same chunk bounds, byte for byte, over appends at a
    chunk's first token, inside a chunk with a key inside its bounds' scale and with one that grows it, and at
    the scratch index."""
    g = torch.Generator().manual_seed(seed)
    slots, heads, chunk, b = 5, 3, 8, 4
    pool = SlotPool(1, slots, heads, 24, d, dtype, torch.device(device), reserve_int8=reserve_int8, chunk=chunk,
                    oversample=4, min_ratio=1)
    pool.ensure_reserve(8 * 24)
    assert pool.two_stage, "two stages did not start"
    fill_reserve(pool, 0, g)
    pool.rpos[:, : pool.cap] = torch.arange(pool.cap) + 4
    n = [40, 43, 0, 21]  # slot 0 starts a chunk, slots 1 and 3 are inside one, slot 2 appends to the scratch index
    for slot in range(slots):
        pool.summarize(0, slot, 0, pool.cap)
    eager = copy.deepcopy(pool)
    for step in range(3):
        at = torch.tensor([n[0] + step, n[1] + step, pool.cap, n[3] + step], device=device)
        magnitude = torch.tensor([1.0, 0.01, 1.0, 50.0 if step == 1 else 0.5]).view(b, 1, 1)
        k = (torch.randn(b, heads, d, generator=g) * magnitude).to(device, dtype)
        v = torch.randn(b, heads, d, generator=g).to(device, dtype)
        eager.reserve_append(0, at, k, v)
        eager.summarize_append(0, at, k)
        append.append(pool, 0, at, k, v)
    names = ["rk", "rv", "smin", "smax", "sscale"] + (["rk_scale", "rv_scale"] if reserve_int8 else [])
    for name in names:
        x, y = getattr(eager, name)[0], getattr(pool, name)[0]
        assert torch.equal(x, y), f"{name} differs at {(x != y).nonzero()[:5].tolist()}"


@torch.inference_mode()
def compare_ring(device: str, dtype: torch.dtype = torch.float32, seed: int = 0, write_fn=ring.ring_write) -> None:
    """engine/ring.py's kernel (the C++ op on CPUs; `write_fn`: another) against the eager indexing it replaces."""
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
        ek, ev, epos, escore = write_fn(pool, layer, write, pos, active, k, v)
        assert torch.equal(ek, eager.k[layer][ar, :, write]) and torch.equal(ev, eager.v[layer][ar, :, write])
        assert torch.equal(epos, eager.pos[layer][ar, :, write])
        assert torch.equal(escore, eager.score[layer][ar, :, write])
        eager.k[layer][ar, :, write], eager.v[layer][ar, :, write] = k, v
        eager.pos[layer][ar, :, write] = torch.where(active, pos, -1).unsqueeze(1)
        eager.score[layer][ar, :, write] = 0.0
        for name in ("k", "v", "pos", "score"):
            assert torch.equal(getattr(eager, name)[layer], getattr(pool, name)[layer]), name
