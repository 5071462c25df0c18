"""GPU acceptance checks of the decode step (run through e2e/gpu-run.sh checks on a CUDA machine):

1. a decode step (forward over the pool, selection, sampling) runs under
   torch.cuda.set_sync_debug_mode("error"): no host synchronisation before the one transfer of token ids;
2. CUDA-graph replay gives the same tokens as eager execution from the same starting state, for every policy.
"""

from __future__ import annotations

import sys

import torch

from slam.bench.shapes import SHAPES, random_model, synthetic_request
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.plan import decode_plan, sampling_batch
from slam.engine.sampler import sample
from slam.engine.sequence import SamplingParams


def engine_for(loaded, policy: str, eager: bool) -> LLMEngine:
    cache = CacheConfig(policy=policy, budget=None if policy == "full" else 256, sink=4, recent=64)
    return LLMEngine(EngineConfig(max_batch=8, cache=cache, enforce_eager=eager, max_budget=3000 if policy == "full" else None), loaded)


def run(loaded, policy: str, eager: bool, steps: int = 24) -> list[list[int]]:
    engine = engine_for(loaded, policy, eager)
    samplings = [SamplingParams(max_tokens=steps + 2, ignore_eos=True, temperature=t, top_p=0.9, seed=i)
                 for i, t in enumerate([0.0, 0.0, 1.0, 0.7, 0.0])]
    seqs = [synthetic_request(engine, 1500 + 211 * i, s, seed=i) for i, s in enumerate(samplings)]
    for _ in range(steps):
        engine.step()
    return [s.output_ids for s in seqs]


def sync_free_step(loaded, policy: str) -> None:
    engine = engine_for(loaded, policy, eager=False)
    seqs = [synthetic_request(engine, 1800, SamplingParams(max_tokens=8, temperature=0.8, seed=i), seed=i)
            for i in range(4)]
    engine.step()  # captures the graph for this bucket
    rows, kc, policies = decode_plan(engine, seqs)
    params = sampling_batch(seqs, loaded.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = engine.runner.decode(rows, kc, policies)
        tokens = sample(logits[: len(seqs)], params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (4,)


def main() -> int:
    loaded = random_model(SHAPES["smollm2-135m"], "bfloat16", "cuda")
    failures = 0
    for policy in ("full", "streaming", "slam", "snapkv", "h2o"):
        eager, graphed = run(loaded, policy, True), run(loaded, policy, False)
        same = eager == graphed
        failures += not same
        print(f"{policy}: graph replay {'equals' if same else 'DIFFERS FROM'} eager over {len(eager[0])} tokens", flush=True)
        try:
            sync_free_step(loaded, policy)
            print(f"{policy}: decode step ran under set_sync_debug_mode('error')", flush=True)
        except Exception as e:  # report every policy, then fail
            failures += 1
            print(f"{policy}: sync check FAILED: {type(e).__name__}: {e}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
