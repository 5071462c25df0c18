"""Micro-benchmark of the launch settings of the decode step's Triton kernels (GPUs), at budget 2048's decode
shapes, each setting replayed from a CUDA graph: stage two's candidate products (cache/fused_dots.py), stage
one's chunk bounds, the placement's two kernels (cache/fused.py, picks alternating between two sets that share
about 42% of their tokens, the benches' churn) and decode attention (engine/decode_attention.py).

    python3 e2e/micro_kernels.py [--shape smollm2-135m|llama-1b|llama-8b] [--batch 32] [--context 32000]

A small run under Triton's interpreter only checks that it runs (`--batch 2 --context 600 --budget 132`).
"""

from __future__ import annotations

import argparse
import itertools
from types import SimpleNamespace

import torch

from slam.bench.shape_configs import SHAPES
from slam.cache import fused, fused_dots, make_policy
from slam.config import CacheConfig
from slam.engine import decode_attention
from slam.engine.pool import SlotPool
from micro_select import timed  # e2e/ is the script's directory

if not torch.cuda.is_available():  # Triton's interpreter: run each setting once, untimed
    def timed(fn) -> float:
        fn()
        return 0.0


def sweep(what: str, module, settings: dict[str, tuple], fn) -> None:
    """Time fn under every combination of the module's settings; print them fastest first."""
    saved = {name: getattr(module, name) for name in settings}
    rows = []
    for values in itertools.product(*settings.values()):
        for name, value in zip(settings, values):
            setattr(module, name, value)
        label = ", ".join(f"{n}={v}" for n, v in zip(settings, values))
        try:
            rows.append((timed(fn), label + (" (default)" if values == tuple(saved.values()) else "")))
        except Exception as e:  # noqa: BLE001  (a setting a kernel cannot take is reported, not fatal)
            rows.append((float("inf"), f"{label}: {type(e).__name__}: {str(e)[:80]}"))
    for name, value in saved.items():
        setattr(module, name, value)
    print(f"{what}, us per call: " + "; ".join(f"{label} {t:.1f}" for t, label in sorted(rows)), flush=True)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2-135m", choices=SHAPES)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=32000)
    p.add_argument("--budget", type=int, default=2048)
    args = p.parse_args()
    shape = SHAPES[args.shape]  # the shapes `slam bench decode --shape` builds
    heads, d = shape["num_key_value_heads"], shape["head_dim"]
    group = shape["num_attention_heads"] // heads
    b, m, chunk = args.batch, args.context, 8
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    middle = make_policy(CacheConfig(policy="slam", budget=args.budget)).middle  # the bench's sink and recent
    pool = SlotPool(1, b, heads, args.budget, d, torch.bfloat16, dev, reserve_int8=True)
    pool.ensure_reserve(m)
    pool.rk[0].copy_(torch.randint(-127, 128, pool.rk[0].shape, generator=g, dtype=torch.int8))
    pool.rv[0].copy_(torch.randint(-127, 128, pool.rv[0].shape, generator=g, dtype=torch.int8))
    pool.rk_scale[0].fill_(0.01)
    pool.rv_scale[0].fill_(0.01)
    pool.rpos[:, :m] = torch.arange(m, device=dev)
    n = torch.full((b,), m, device=dev)
    q = torch.randn(b, heads, group, d, generator=g).to(dev, torch.bfloat16)

    # Stage two: 2 x middle's worth of chunks per row, and the latest chunk.
    first = 2 * middle // chunk
    chunks = torch.stack([torch.randperm(m // chunk, generator=g)[: first + 1] for _ in range(b * heads)])
    chunks = chunks.view(b, heads, -1).to(dev)
    fresh = torch.ones(b, heads, first + 1, dtype=torch.bool, device=dev)
    keys, scales = pool.rk[0], pool.rk_scale[0]
    sweep(f"stage two products, {first + 1} chunks", fused_dots, {"CHUNKS": (8, 16, 32), "DOTS_WARPS": (2, 4, 8)},
          lambda: fused_dots.chunk_dots_stored(q, keys, chunks, chunk, scales, pool.rpos, n, fresh))

    # Stage one: the bounds of every chunk of the reserve.
    nch = m // chunk
    smin = torch.randint(-127, 0, (b, heads, nch + 1, d), generator=g, dtype=torch.int8).to(dev)
    smax = torch.randint(0, 128, (b, heads, nch + 1, d), generator=g, dtype=torch.int8).to(dev)
    sscale = torch.full((b, heads, nch + 1), 0.01, device=dev)
    sweep(f"stage one bounds, {nch} chunks", fused_dots, {"BOUND_ROWS": (32, 64, 128), "BOUND_WARPS": (2, 4, 8)},
          lambda: fused_dots.bound_dots(q, smin, smax, sscale, nch, chunk, n))

    # Placement: two pick sets sharing about 42% of their tokens, alternating.
    base = torch.stack([torch.randperm(m, generator=g)[: 2 * middle] for _ in range(b * heads)]).view(b, heads, -1)
    keep = int(0.42 * middle)
    picks = [base[..., :middle], torch.cat([base[..., :keep], base[..., middle:2 * middle - keep]], dim=-1)]
    picks = [x.to(dev) for x in picks]
    score = torch.zeros(b, heads, middle, device=dev)
    mine = torch.ones(b, dtype=torch.bool, device=dev)
    plan = SimpleNamespace(sink=torch.full((b,), 4, device=dev), middle=torch.full((b,), middle, device=dev),
                           once=lambda _key, make: make())

    def place_both():
        for idx in picks:
            fused.place(pool, 0, plan, idx, score, mine)

    sweep("placement, keep and copy, twice", fused, {"KEEP_WARPS": (4, 8, 16)}, place_both)
    sweep("placement, keep and copy, twice", fused, {"COPY_BLOCK": (32, 64, 128), "COPY_WARPS": (2, 4, 8)},
          place_both)

    # Decode attention over the pool's budget + 1 columns.
    qa = torch.randn(b, heads * group, 1, d, generator=g).to(dev, torch.bfloat16)
    valid = torch.ones(b, heads, 1, args.budget + 1, dtype=torch.bool, device=dev)
    sweep("decode attention", decode_attention, {"COLUMNS": (64, 128, 256), "WARPS": (2, 4, 8)},
          lambda: decode_attention.attend(qa, pool.k[0][:b], pool.v[0][:b], valid, d**-0.5))


if __name__ == "__main__":
    main()
