"""`slam bench decode`: engine throughput per policy, context length and batch size, without HTTP.

For each combination it prefills `batch` prompts of `context` tokens, then times `tokens` decode steps.
Memory is what the policy keeps: bytes of the active cache per request, and on CUDA the peak allocated.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams
from slam.eval.corpus import essays_text


@dataclass
class DecodeResult:
    policy: str
    budget: int | None
    context: int
    batch: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # generated tokens per second over the whole batch
    step_ms: float
    cache_mib_per_request: float
    peak_gpu_mib: float | None
    device: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_one(engine: LLMEngine, cache: CacheConfig, context: int, batch: int, tokens: int) -> DecodeResult:
    corpus = engine.tokenizer.encode(essays_text())
    prompts = [corpus[i * 997 : i * 997 + context] for i in range(batch)]
    device = engine.runner.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # No length limit: the timed steps below must each decode every request of the batch. Requests that
    # finish their prefill early already decode while others prefill; that is not timed.
    sampling = SamplingParams(max_tokens=10**9, ignore_eos=True)
    seqs = [engine.add_request(p, sampling, cache) for p in prompts]
    _sync(device)
    start = time.perf_counter()
    while not all(s.output_ids for s in seqs):
        engine.step()
    _sync(device)
    prefill_s = time.perf_counter() - start
    cache_bytes = max(s.cache_bytes() for s in seqs)
    start = time.perf_counter()
    for _ in range(tokens):
        engine.step()
    _sync(device)
    decode_s = time.perf_counter() - start
    for seq in seqs:
        engine.abort(seq)
    engine.step()  # reaps the aborted requests and frees their caches
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return DecodeResult(
        policy=cache.policy, budget=cache.budget, context=context, batch=batch,
        prefill_tokens_per_s=batch * context / prefill_s, decode_tokens_per_s=batch * tokens / decode_s,
        step_ms=1000 * decode_s / tokens, cache_mib_per_request=cache_bytes / 2**20,
        peak_gpu_mib=peak, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    )


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    caches = [CacheConfig(policy=p, budget=None if p == "full" else args.budget, sink=args.sink, recent=args.recent)
              for p in args.policies]
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                    max_batch=max(args.batches), prefill_chunk=args.prefill_chunk, cache=caches[0]))
    # One short run first, so that one-time costs (allocator, kernels) are not charged to the first row.
    bench_one(engine, caches[0], min(args.contexts), 1, 4)
    combos = [(c, n, b) for c in caches for n in args.contexts for b in args.batches]
    results = []
    for cache, context, batch in tqdm(combos, desc="bench decode", file=sys.stderr):
        result = bench_one(engine, cache, context, batch, args.tokens)
        results.append(result)
        if args.json:
            print(json.dumps(asdict(result)), flush=True)
    if not args.json:
        table = Table(title=f"slam bench decode on {results[0].device}")
        for column in ("policy", "budget", "context", "batch", "prefill tok/s", "decode tok/s", "step ms", "cache MiB/req", "peak GPU MiB"):
            table.add_column(column, justify="right")
        for r in results:
            table.add_row(r.policy, str(r.budget or "-"), str(r.context), str(r.batch), f"{r.prefill_tokens_per_s:.0f}",
                          f"{r.decode_tokens_per_s:.1f}", f"{r.step_ms:.1f}", f"{r.cache_mib_per_request:.2f}",
                          "-" if r.peak_gpu_mib is None else f"{r.peak_gpu_mib:.0f}")
        Console().print(table)
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results: list[DecodeResult], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for policy in dict.fromkeys(r.policy for r in results):
        for batch in sorted({r.batch for r in results}):
            rows = [r for r in results if r.policy == policy and r.batch == batch]
            label = f"{policy}, batch {batch}"
            axes[0].plot([r.context for r in rows], [r.decode_tokens_per_s for r in rows], marker="o", label=label)
            axes[1].plot([r.context for r in rows], [r.cache_mib_per_request for r in rows], marker="o", label=label)
    axes[0].set_ylabel("decode tokens/s (batch total)")
    axes[1].set_ylabel("active cache MiB per request")
    for ax in axes:
        ax.set_xlabel("context tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def add_parser(sub) -> None:
    from slam.cli import add_model_flags, positive_list

    p = sub.add_parser("decode", help="engine prefill/decode throughput and cache memory per policy")
    p.add_argument("--policies", type=positive_list(str), default=["full", "streaming", "slam"])
    p.add_argument("--contexts", type=positive_list(int), default=[512, 2000, 4000])
    p.add_argument("--batches", type=positive_list(int), default=[1])
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed per combination")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, default=None)
    add_model_flags(p)
    p.set_defaults(func=run)
