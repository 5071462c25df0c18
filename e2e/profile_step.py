"""Where a decode step's time goes on a GPU: kernel time by name (eager steps under torch.profiler) and the
wall time of graph-replayed steps, per policy. Run through e2e/gpu-run.sh profile.

    python3 e2e/profile_step.py [--policies streaming,slam] [--batch 32] [--context 4000] [--budget 256]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
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
                          max_prompt_tokens=args.context + 64,
                          max_budget=args.context + 64 if policy == "full" else None,
                          select_oversample=args.oversample, select_every=args.every, select_min_ratio=args.min_ratio,
                          compile=not args.no_compile, reserve_dtype=args.reserve_dtype)
    engine = LLMEngine(config, loaded)
    # --split runs about 200 steps; the reserve then has room for them (a bit above the bench's 4K row).
    sampling = SamplingParams(max_tokens=256 if args.split else 64, ignore_eos=True)
    for i in range(args.batch):
        synthetic_request(engine, args.context, sampling, seed=i)
    return engine


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--policies", default="streaming,slam")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=4000)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--min-ratio", type=int, default=4, help="two stages start once the reserve holds this many "
                   "times the candidates (1: at once)")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reserve-dtype", default="auto", choices=["auto", "bfloat16", "int8"])
    p.add_argument("--host", action="store_true", help="where a graph step's host time goes, instead of the "
                   "eager kernel table: Python functions (cProfile) and CUDA calls (torch.profiler, CPU side)")
    p.add_argument("--split", action="store_true", help="a graph step's wall time split into host work before "
                   "the launch, the launch, and the wait for the device; slam with and without cache/fused_top.py")
    p.add_argument("--no-fused-top", action="store_true", help="selection through torch's top-k, not cache/fused_top.py")
    args = p.parse_args()
    if args.no_fused_top:
        from slam.cache import fused_top

        fused_top.applies = lambda *_: False
    loaded = random_model(SHAPES[args.shape], args.dtype, args.device)
    for policy in args.policies.split(","):
        engine = engine_for(loaded, policy, args, eager=False)
        for _ in range(3):
            engine.step()
        wall = per_call(engine.step)
        replay = float("nan")
        if engine.runner.graphs:  # the device's share: the last captured step replayed back to back
            replay = per_call(list(engine.runner.graphs.values())[-1][0].replay)
        if args.split:
            split(engine, policy)
            del engine
            continue
        if args.host:
            host_profile(engine, policy, wall, replay, args)
            del engine
            continue
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


def split(engine: LLMEngine, policy: str, rounds: int = 2, calls: int = 16) -> None:
    """Per graph step: wall, the captured graph replayed alone, and the host's share (plan before the launch,
    the launch itself, the rest), alternating slam's fused top-k on and off (graphs recaptured)."""
    from slam.cache import fused_top

    applies, runner, spent = fused_top.applies, engine.runner, {}
    decode, post = runner.decode, engine.postprocess

    def timed(name, fn, wait=False):
        def call(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            if wait:
                sync()
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
            return out
        return call

    variants = [("fused top", applies), ("torch top-k", lambda *_: False)] if policy == "slam" else [("", applies)]
    for r in range(rounds):
        for name, rule in variants:
            fused_top.applies = rule
            runner.graphs.clear()
            runner.graph_pool = None  # the old graphs' memory pool goes with them
            runner.decode, engine.postprocess = decode, post
            for _ in range(3):
                engine.step()
            wall = per_call(engine.step, calls)
            replay = per_call(list(runner.graphs.values())[-1][0].replay, calls) if runner.graphs else float("nan")
            spent.clear()
            runner.decode, engine.postprocess = timed("launch", decode), timed("post", post)
            per_call(engine.step, calls)
            launch, rest = spent["launch"] / calls, spent["post"] / calls
            spent.clear()
            runner.decode = timed("gpu", decode, wait=True)
            in_step = per_call(engine.step, calls)
            print(f"{policy} {name} round {r}: wall {1000 * wall:.2f} ms, replay alone {1000 * replay:.2f}, launch "
                  f"{1000 * launch:.2f}, postprocess with the wait {1000 * rest:.2f}, launch + device "
                  f"{1000 * spent['gpu'] / calls:.2f} (wall then {1000 * in_step:.2f})", flush=True)
    fused_top.applies, runner.decode, engine.postprocess = applies, decode, post


def host_profile(engine: LLMEngine, policy: str, wall: float, replay: float, args) -> None:
    """A graph step's host side: Python functions by own time (a step's wait for the device shows as the
    call that syncs), then CUDA runtime calls by host time."""
    print(f"\n=== {policy}: graph step {1000 * wall:.2f} ms wall, {1000 * replay:.2f} ms replay alone "
          f"(batch {args.batch}, context {args.context}, budget {args.budget}, host side below)")
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(16):
        engine.step()
    sync()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
        for _ in range(8):
            engine.step()
        sync()
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
