"""How many kernels a GPU decode step launches per layer, counted on a CPU: the GPU path (Triton kernels, no
C++ ops) runs under Triton's interpreter, aten ops are counted by a dispatch mode (views and allocations
left out), Triton launches by name, and each aten op is charged to the innermost slam function that called
it. A CUDA graph replays each launch as one node of a few microseconds, so at decode shapes the count bounds
the step (docs/benchmarks.md, "Fewer kernels per layer").

    TRITON_INTERPRET=1 PYTHONPATH=server python e2e/count_kernels.py [--context 6000] [--every 4] [--min-ratio 1]
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback

from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

from slam.bench.shapes import SHAPES, random_model, synthetic_request
from slam.cache import cpu_kernels, fused
from slam.config import CacheConfig, EngineConfig
from slam.engine import decode_attention, ring
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams

NOT_KERNELS = {"view", "_unsafe_view", "expand", "unsqueeze", "squeeze", "select", "slice", "as_strided", "t",
               "transpose", "permute", "alias", "detach", "unbind", "split", "reshape", "flatten", "view_as",
               "lift_fresh", "split_with_sizes", "narrow", "unflatten", "empty", "empty_like", "to", "contiguous",
               "item"}


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter = collections.Counter()
        self.launches: collections.Counter = collections.Counter()
        self.inside = False  # an interpreted Triton kernel's own tensor work is not the step's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside and func.overloadpacket.__name__ not in NOT_KERNELS:
            caller = next((f for f in reversed(traceback.extract_stack(limit=14)[:-1]) if "/slam/" in f.filename), None)
            self.sites[f"{caller.filename.split('/slam/')[1]}:{caller.name}" if caller else "?"] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=6000)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--min-ratio", type=int, default=1, help="1: two stages from the start; large: exact selection")
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    # The GPU path on a CPU: Triton kernels wherever a GPU would run them, no C++ ops.
    fused.available = lambda pool: True
    ring.available = decode_attention.available = lambda device: True
    ring.ring_write = ring.kernel_ring_write
    cpu_kernels.available = lambda: False
    counter = Counter()
    run = InterpretedFunction.run

    def counted(self, *a, **k):
        counter.launches[self.fn.__name__] += 1
        counter.inside = True
        try:
            return run(self, *a, **k)
        finally:
            counter.inside = False

    InterpretedFunction.run = counted
    shape = {**SHAPES["smollm2-135m"], "num_hidden_layers": args.layers}
    cache = CacheConfig(policy="slam", budget=args.budget, sink=4, recent=64)
    config = EngineConfig(max_batch=2, cache=cache, enforce_eager=True, dtype="float32",
                          max_model_len=args.context + 64, max_prompt_tokens=args.context + 64,
                          select_every=args.every, select_min_ratio=args.min_ratio, compile=True, reserve_dtype="int8")
    engine = LLMEngine(config, random_model(shape, "float32", "cpu"))
    for i in range(2):
        synthetic_request(engine, args.context, SamplingParams(max_tokens=64, ignore_eos=True), seed=i)
    for _ in range(2):
        engine.step()
    pool = engine.runner.pool
    print(f"fused {pool.fused}, two stages {pool.two_stage}, oversampling {pool.oversample}, r = {args.every}")
    for _ in range(args.every):  # one step of each refresh phase
        counter.sites.clear()
        counter.launches.clear()
        with counter:
            engine.step()
        aten = sum(counter.sites.values())
        print(f"aten ops {aten} ({aten / args.layers:.1f} per layer); Triton launches {dict(counter.launches)}")
        print("  by caller:", ", ".join(f"{k} {v}" for k, v in counter.sites.most_common()))


if __name__ == "__main__":
    main()
