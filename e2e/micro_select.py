"""Micro-benchmarks of the pieces of slam's exact selection on a GPU, at decode shapes: scoring orientation,
compiled scoring, top-k variants. Each variant runs inside a CUDA graph, timed by CUDA events.

    python3 e2e/micro_select.py [--batch 32] [--reserve 4000,32000]
"""

from __future__ import annotations

import argparse

import torch

from slam.cache.selection import group_scores


def timed(fn, iters: int = 50) -> float:
    """Microseconds per call of `fn` replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / iters


def scores_kq(q, keys, stored, scale):
    logits = (keys @ q.transpose(-1, -2)).transpose(-1, -2).float() * scale
    logits = logits.masked_fill(~stored.unsqueeze(2), float("-inf"))
    scores = torch.log_softmax(logits, dim=-1).amax(dim=2)
    return torch.where(stored, scores, float("-inf"))


def scores_f32(q, keys, stored, scale):
    logits = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~stored.unsqueeze(2), float("-inf"))
    scores = torch.log_softmax(logits, dim=-1).amax(dim=2)
    return torch.where(stored, scores, float("-inf"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reserve", default="4000,32000")
    args = p.parse_args()
    b, h, g, d, kc = args.batch, 3, 3, 64, 188
    compiled = torch.compile(group_scores, dynamic=False)
    compiled_kq = torch.compile(scores_kq, dynamic=False)
    for m in (int(x) for x in args.reserve.split(",")):
        q = torch.randn(b, h, g, d, device="cuda", dtype=torch.bfloat16)
        store = torch.randn(b, h, m + 1, d, device="cuda", dtype=torch.bfloat16)
        keys = store[:, :, :m]
        stored = torch.ones(b, 1, m, dtype=torch.bool, device="cuda")
        scale = d**-0.5
        s = group_scores(q, keys, stored, scale)
        s16 = s.half()
        rows = {
            "matmul q@kT": lambda: q @ keys.transpose(-1, -2),
            "matmul k@qT": lambda: keys @ q.transpose(-1, -2),
            "matmul q@kT fp32": lambda: q.float() @ keys.float().transpose(-1, -2),
            "bmm out_dtype fp32": lambda: torch.bmm(q.flatten(0, 1), keys.flatten(0, 1).transpose(-1, -2),
                                                    out_dtype=torch.float32),
            "einsum": lambda: torch.einsum("bhgd,bhmd->bhgm", q, keys),
            "group_scores": lambda: group_scores(q, keys, stored, scale),
            "group_scores k@qT": lambda: scores_kq(q, keys, stored, scale),
            "group_scores compiled": lambda: compiled(q, keys, stored, scale),
            "group_scores k@qT compiled": lambda: compiled_kq(q, keys, stored, scale),
            "topk sorted": lambda: s.topk(kc, dim=-1),
            "topk unsorted": lambda: s.topk(kc, dim=-1, sorted=False),
            "topk unsorted fp16": lambda: s16.topk(kc, dim=-1, sorted=False),
            "topk unsorted k=64": lambda: s.topk(64, dim=-1, sorted=False),
            "sort [b,h,kc] long": lambda: torch.randint(0, m, (b, h, kc), device="cuda").sort(dim=-1),
            "index_select rows": lambda: store.view(-1, d).index_select(0, torch.arange(b * h * kc, device="cuda")),
        }
        print(f"\nreserve {m}, batch {b}: microseconds per call (one layer)")
        for name, fn in rows.items():
            try:
                print(f"  {name:32s} {timed(fn):8.1f}")
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                print(f"  {name:32s} failed: {type(e).__name__}: {str(e)[:120]}")


if __name__ == "__main__":
    main()
