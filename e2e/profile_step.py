"""Where a decode step's time goes on a GPU: kernel time by name (eager steps under torch.profiler) and the
wall time of graph-replayed steps, per policy. Run through e2e/gpu-run.sh profile.

    python3 e2e/profile_step.py [--policies streaming,slam] [--batch 32] [--context 4000] [--budget 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from slam.bench.shapes import SHAPES, random_model, synthetic_request
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_call(fn, calls: int = 16) -> float:
    """Seconds per call of `fn`, the device drained before and after."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def engine_for(loaded, policy: str, args, eager: bool) -> LLMEngine:
    cache = CacheConfig(policy=policy, budget=None if policy == "full" else args.budget, sink=4, recent=64)
    config = EngineConfig(max_batch=args.batch, cache=cache, enforce_eager=eager, dtype=args.dtype, max_model_len=args.context + 64,
                          max_budget=args.context + 64 if policy == "full" else None,
                          select_oversample=args.oversample, select_every=args.every,
                          compile=not args.no_compile)
    engine = LLMEngine(config, loaded)
    sampling = SamplingParams(max_tokens=64, ignore_eos=True)
    for i in range(args.batch):
        synthetic_request(engine, args.context, sampling, seed=i)
    return engine


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--policies", default="streaming,slam")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=4000)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    loaded = random_model(SHAPES["smollm2-135m"], args.dtype, args.device)
    for policy in args.policies.split(","):
        engine = engine_for(loaded, policy, args, eager=False)
        for _ in range(3):
            engine.step()
        wall = per_call(engine.step)
        replay = float("nan")
        if engine.runner.graphs:  # the device's share: the last captured step replayed back to back
            replay = per_call(list(engine.runner.graphs.values())[-1][0].replay)
        del engine
        engine = engine_for(loaded, policy, args, eager=True)
        for _ in range(2):
            engine.step()
        sync()
        gpu_run = args.device != "cpu"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu_run else [])
        key = "self_device_time_total" if gpu_run else "self_cpu_time_total"
        with profile(activities=activities) as prof:
            for _ in range(4):
                engine.step()
            sync()
        events = prof.key_averages()
        print(f"\n=== {policy}: graph step {1000 * wall:.2f} ms wall, {1000 * replay:.2f} ms replay alone (4 eager steps profiled below) "
              f"(batch {args.batch}, context {args.context}, budget {args.budget}, oversample {args.oversample}, "
              f"every {args.every}, compile {not args.no_compile})")
        print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
        del engine


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
