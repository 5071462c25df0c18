"""A batch of short requests beside one long one, against short ones alone (int8 reserve, budget 2048, batch 32,
r = 4): the cost a long request puts on its neighbours. `python3 e2e/mixed_batch.py` on a GPU; env LONG and SHORT
set the contexts, DEV=cpu runs a small check on the CPU."""

import os
import time

import torch
from slam.bench.decode import warm_up
from slam.bench.shapes import SHAPES, random_model, synthetic_request
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams

DEV = os.environ.get("DEV", "cuda")
LONG, SHORT = int(os.environ.get("LONG", "131072")), int(os.environ.get("SHORT", "4000"))


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    dtype = "bfloat16" if DEV == "cuda" else "float32"
    loaded = random_model(SHAPES["smollm2-135m"], dtype, DEV)
    for label, contexts in ((f"32 x {SHORT}", [SHORT] * 32), (f"31 x {SHORT} + 1 x {LONG}", [LONG] + [SHORT] * 31)):
        config = EngineConfig(max_batch=32, cache=CacheConfig(policy="slam", budget=2048, sink=4, recent=64),
                              dtype=dtype, max_model_len=LONG + 200, max_prompt_tokens=LONG + 8,
                              reserve_dtype="int8", select_every=4)
        engine = LLMEngine(config, loaded)
        seqs = [synthetic_request(engine, c, SamplingParams(max_tokens=80, ignore_eos=True), seed=i)
                for i, c in enumerate(contexts)]
        engine.runner.rope.ensure(LONG + 100)
        warm_up(engine.step, loaded.device, engine.runner.select_every)
        sync()
        start = time.perf_counter()
        for _ in range(16):
            engine.step()
        sync()
        pool = engine.runner.pool
        print(f"{label}: {(time.perf_counter() - start) / 16 * 1000:.2f} ms/step, two stages {pool.two_stage}, "
              f"reserve capacity {pool.cap}", flush=True)
        del engine, seqs
        if DEV == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
