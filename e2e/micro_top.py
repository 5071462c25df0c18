"""Micro-benchmark of the top-k kernels of cache/fused_top.py at decode shapes (GPUs): one program per row
(bisection over the key bits), from stored flags and from reserve positions, against the long-row block
kernels, each replayed from a CUDA graph.

    python3 e2e/micro_top.py [--batch 32]
"""

from __future__ import annotations

import argparse

import torch

from slam.cache import fused_top
from micro_select import timed  # e2e/ is the script's directory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    b = args.batch
    default_warps = fused_top.ROW_WARPS
    # (what, kv heads, group, row length, picks): stage two at budget 2048 with oversampling 2 (SmolLM2,
    # Llama-8B), exact scoring at 4K, stage one's chunks at 32K.
    shapes = (("stage two, smollm2", 3, 3, 3960, 1980), ("stage two, llama-8b", 8, 4, 3960, 1980),
              ("exact 4K, smollm2", 3, 3, 3930, 1980), ("stage one 32K", 3, 3, 4000, 495))
    for what, heads, group, m, kc in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        logits = torch.randn(b, heads, group, m, device="cuda", generator=g) * 8
        n = torch.full((b,), m, device="cuda")
        rpos = torch.arange(m + 1, device="cuda").repeat(b, 1)
        stored = torch.ones(b, 1, m, dtype=torch.bool, device="cuda")
        limit = torch.full((b,), kc, device="cuda")
        times = []
        for warps in (4, 8, 16):
            fused_top.ROW_WARPS = warps
            row = timed(lambda: fused_top.stored_top(logits, stored, kc, 0.125, limit))
            bisect = timed(lambda: fused_top.group_top(logits, rpos, n, kc, 0.125, limit))
            times.append(f"{warps} warps: from flags {row:.1f}, from positions {bisect:.1f}")
        fused_top.ROW_WARPS = default_warps
        saved, fused_top.SPAN_LIMIT = fused_top.SPAN_LIMIT, 0
        blocks = timed(lambda: fused_top.stored_top(logits, stored, kc, 0.125, limit))
        fused_top.SPAN_LIMIT = saved
        print(f"{what}: batch {b}, {heads} heads x {group}, {m} columns, {kc} picks, us per call: one program "
              f"({'; '.join(times)}), block kernels {blocks:.1f}", flush=True)


if __name__ == "__main__":
    main()
