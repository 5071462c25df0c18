"""GPU check of async scheduling with real prefills (run by e2e/gpu_checks.py, or alone on a CUDA machine):
requests with prompts of random ids join at different steps, end by length or on a stop token, greedy and
seeded, under CUDA graphs with steps launched ahead and with every step in order; their tokens must agree.
Prefill chunks launched while a step is in flight must not wait for it: they run under the sync debug mode's
warnings, and none may come.

    PYTHONPATH=server:. python3 e2e/async_check.py
"""

from __future__ import annotations

import sys
import warnings

import torch

from slam.bench.shapes import SHAPES, random_model
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams

JOIN = {0: [0, 1, 2], 3: [3], 7: [4, 5]}  # step -> requests added after it


def watch_prefill(engine: LLMEngine, found: list[str]) -> None:
    """Each prefill chunk launched while a step is in flight runs under set_sync_debug_mode("warn"); what it
    warns of (a copy or read that waits for the device) goes to `found`, with the line that did it."""
    prefill = engine.runner.prefill

    def watched(*args, **kwargs):
        if engine.in_flight is None:
            return prefill(*args, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return prefill(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                found.extend(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught)

    engine.runner.prefill = watched


def run(loaded, mode: str, syncs: list[str] | None = None) -> tuple[list[list[int]], int]:
    cache = CacheConfig(policy="slam", budget=256, sink=4, recent=64)
    engine = LLMEngine(EngineConfig(max_batch=8, cache=cache, prefill_chunk=512, async_scheduling=mode), loaded)
    if syncs is not None:
        watch_prefill(engine, syncs)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, engine.runner.vocab_size, (300 + 150 * i,), generator=g).tolist() for i in range(6)]
    params = [SamplingParams(max_tokens=20 + 3 * i, ignore_eos=True,
                             **({"temperature": 0.8, "seed": i} if i % 2 else {})) for i in range(6)]
    seqs: dict[int, object] = {}
    step = 0
    while step == 0 or engine.has_work():
        for i in JOIN.get(step, []):
            seqs[i] = engine.add_request(prompts[i], params[i])
        engine.step()
        step += 1
    return [seqs[i].output_ids for i in sorted(seqs)], engine.stats.steps_ahead


def check(loaded) -> bool:
    in_order, ahead_none = run(loaded, "off")
    syncs: list[str] = []
    ahead, steps_ahead = run(loaded, "auto", syncs)
    same = in_order == ahead and ahead_none == 0 and steps_ahead > 0
    print(f"prefill chunks launched while a step was in flight: {len(syncs)} synchronizing operations"
          + "".join(f"\n  {x}" for x in sorted(set(syncs))[:10]), flush=True)
    print(f"async scheduling with prefills: {steps_ahead} steps ahead; tokens "
          f"{'equal' if in_order == ahead else 'DIFFER FROM'} steps in order"
          + ("" if in_order == ahead else f" (lengths {[len(x) for x in ahead]} against {[len(x) for x in in_order]})"),
          flush=True)
    return same and not syncs


if __name__ == "__main__":
    sys.exit(0 if check(random_model(SHAPES["smollm2-135m"], "bfloat16", "cuda")) else 1)
