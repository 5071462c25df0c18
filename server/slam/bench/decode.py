"""`slam bench decode`: decode throughput per policy, context and batch, beside a same-run baseline.

Each row times `tokens` decode steps of `batch` requests that hold `context` tokens. With `--shape` the
model is built from a config with random weights (nothing is downloaded) and each request's cache is
filled with random keys and values as if its prompt had been prefilled: the decode step, not prefill,
is measured. `--baseline transformers` times transformers' own full-cache decode at the same batch and
context in the same process, shown as a ratio. The roofline is the step time if the bytes a step must
read (weights, plus the keys and values it attends to or scores) streamed at the bandwidth measured at
start.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slam.bench.shapes import SHAPES, bandwidth, kv_read_bytes, random_model, synthetic_request, weight_bytes
from slam.cache import make_policy
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams
from slam.flags import selection


@dataclass
class DecodeResult:
    engine: str  # "slam" or "transformers"
    policy: str
    budget: int | None
    context: int
    batch: int
    decode_tokens_per_s: float | None  # whole batch; None: did not fit
    step_ms: float | None
    roofline_ms: float
    roofline_pct: float | None
    peak_gpu_mib: float | None
    device: str
    baseline_ratio: float | None = None  # tokens/s over the baseline's at the same batch and context
    note: str = ""
    kv_mib_per_request: float | None = None  # device memory of one request's cache (and reserve tier)
    reserve_dtype: str | None = None  # slam's reserve as the engine resolved --reserve-dtype
    select_oversample: int | None = None  # slam's two-stage oversampling as the pool resolved it (0: exact only)
    async_scheduling: bool | None = None  # whether steps ran ahead of their postprocessing (engine rows)
    # slam: % of the middle columns whose token was replaced per step (mean over layers, KV heads and requests).
    # Random weights and caches make near-random picks; real text changes far fewer (NIAH's churn).
    churn_pct: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


WARMUP_S, WARMUP_STEPS = 0.5, 64  # warm-up before timing: at least 3 steps and WARMUP_S, at most WARMUP_STEPS


def warm_up(step, device: torch.device, phases: int = 1) -> None:
    """Run steps until the device is warm: graphs captured, kernels compiled, and the GPU at its working
    clocks (an idle GPU takes a few hundred milliseconds to reach them, which would count against short rows).
    phases: steps before the decode graphs repeat (two-stage selection captures one per refresh phase, each
    taking longer than many steps at long contexts; one left to the timed steps inflated them by half)."""
    start = time.perf_counter()
    for i in range(max(WARMUP_STEPS, phases + 2)):
        step()
        if i >= phases + 1:
            _sync(device)
            if time.perf_counter() - start > WARMUP_S:
                return


def seconds_per_step(step, tokens: int, device: torch.device) -> float:
    """Wall seconds per call of `step` over `tokens` calls, the device drained at the end."""
    start = time.perf_counter()
    for _ in range(tokens):
        step()
    _sync(device)
    return (time.perf_counter() - start) / tokens


def release_memory(device: torch.device) -> None:
    """What an earlier measurement left (reference cycles, the allocator's cached blocks) goes back to the
    device before the next one allocates."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_engine(loaded, cache: CacheConfig, context: int, batch: int, tokens: int, args, gbps: float) -> DecodeResult:
    device = loaded.device
    full = cache.policy == "full"
    length = context + WARMUP_STEPS + tokens + 8  # the most a request reaches
    release_memory(device)
    # A server's default length, or the run's when longer: the reserve's capacity follows it, and with it
    # whether two-stage selection runs (pool.ensure_reserve).
    served = max(length, loaded.model.config.max_position_embeddings, 16)
    config = EngineConfig(max_batch=batch, cache=cache, dtype=args.dtype, max_budget=length if full else None,
                          max_model_len=served, max_prompt_tokens=max(context + 8, 16),
                          enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
                          compile=args.compile,
                          **selection(args))
    engine = LLMEngine(config, loaded)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampling = SamplingParams(max_tokens=tokens + WARMUP_STEPS + 4, ignore_eos=True)
    seqs = [synthetic_request(engine, context, sampling, seed=i) for i in range(batch)]
    engine.runner.rope.ensure(length + 1)  # a table grown between timed steps would recapture the graphs
    warm_up(engine.step, device, engine.runner.select_every)
    pool = engine.runner.pool
    replaced = int(pool.replaced.sum())  # reads the device: outside the timed steps
    step_s = seconds_per_step(engine.step, tokens, device)
    assert all(len(s.output_ids) >= tokens for s in seqs)
    middle = make_policy(cache).middle if cache.policy == "slam" else 0
    columns = tokens * batch * pool.layers * pool.kv_heads * middle  # middle columns the timed steps could refill
    churn = (int(pool.replaced.sum()) - replaced) / columns if middle else None
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    roof = (weight_bytes(loaded.model) + kv_read_bytes(engine, cache, context, batch)) / (gbps * 1e9)
    reserve_dtype, oversample = "int8" if pool.reserve_int8 else "bfloat16", pool.oversample
    ahead = engine.async_scheduling
    kv_mib = (pool.nbytes_per_slot() + pool.reserve_nbytes_on_device() / pool.slots) / 2**20
    if device.type != "cuda":
        kv_mib = None
    del engine, seqs, pool
    return DecodeResult("slam", cache.policy, cache.budget, context, batch, batch / step_s, 1000 * step_s,
                        1000 * roof, 100 * roof / step_s, peak, _device_name(device), kv_mib_per_request=kv_mib,
                        reserve_dtype=reserve_dtype, select_oversample=oversample if cache.policy == "slam" else None,
                        async_scheduling=ahead, churn_pct=None if churn is None else 100 * churn)


@torch.inference_mode()
def bench_transformers(loaded, context: int, batch: int, tokens: int, gbps: float) -> DecodeResult:
    """transformers' decode with its full DynamicCache (sdpa), the cache filled with random keys/values."""
    model, device = loaded.model, loaded.device
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * batch * model.dtype.itemsize
    roof = (weight_bytes(model) + kv_bytes) / (gbps * 1e9)
    name = _device_name(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        step_s = _time_full_cache(model, context, batch, tokens, head_dim)
    except torch.OutOfMemoryError:
        step_s = None
    if step_s is None:
        # Released here, after the except block, whose traceback holds the cache: memory kept by it made the
        # next engine of the run report "does not fit" too.
        release_memory(device)
        return DecodeResult("transformers", "full", None, context, batch, None, None, 1000 * roof, None, None, name,
                            note="does not fit", kv_mib_per_request=kv_bytes / batch / 2**20)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return DecodeResult("transformers", "full", None, context, batch, batch / step_s, 1000 * step_s, 1000 * roof,
                        100 * roof / step_s, peak, name, kv_mib_per_request=kv_bytes / batch / 2**20)


def _time_full_cache(model, context: int, batch: int, tokens: int, head_dim: int) -> float:
    """Seconds per decode step of `model` with a DynamicCache of `context` random tokens per request."""
    from transformers import DynamicCache

    cfg, device = model.config, model.device
    cache = DynamicCache()
    shape = (batch, cfg.num_key_value_heads, context, head_dim)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, device=device, dtype=model.dtype),
                     torch.randn(shape, device=device, dtype=model.dtype), layer)
    state = {"ids": torch.randint(0, cfg.vocab_size, (batch, 1), device=device),
             "mask": torch.ones(batch, context + 1, dtype=torch.long, device=device)}

    def step():
        out = model(input_ids=state["ids"], past_key_values=cache, attention_mask=state["mask"], use_cache=True)
        state["ids"] = out.logits[:, -1:].argmax(-1)
        state["mask"] = torch.cat([state["mask"], state["mask"][:, :1]], dim=1)

    warm_up(step, device)
    return seconds_per_step(step, tokens, device)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    if args.shape:
        loaded = random_model(SHAPES[args.shape], args.dtype, args.device)
    else:
        from slam.model import load_model

        loaded = load_model(args.model, args.dtype, args.device)
    gbps = bandwidth(loaded.device)
    caches = [CacheConfig(policy=p, budget=None if p == "full" else args.budget, sink=args.sink, recent=args.recent)
              for p in args.policies]
    combos = [(n, b) for n in args.contexts for b in args.batches]
    results: list[DecodeResult] = []
    best: dict[tuple, DecodeResult] = {}
    # With --repeat R every combination is timed in each of R passes over them all, and a row is its fastest
    # pass: a shared machine's neighbours only add time, in bursts that can cover a whole combination, and
    # passes spread a row's timings over the run. Rows are printed as the last pass gives them.
    passes = [(p, c) for p in range(args.repeat) for c in combos]
    for pass_no, (context, batch) in tqdm(passes, desc="bench decode", file=sys.stderr):
        base = bench_transformers(loaded, context, batch, args.tokens, gbps) if args.baseline == "transformers" else None
        rows = [base] if base else []
        for cache in caches:
            try:
                rows.append(bench_engine(loaded, cache, context, batch, args.tokens, args, gbps))
            except torch.OutOfMemoryError:
                rows.append(DecodeResult("slam", cache.policy, cache.budget, context, batch, None, None, 0.0, None,
                                         None, _device_name(loaded.device), note="does not fit"))
            gc.collect()
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
        for row in rows:
            key = (row.engine, row.policy, context, batch)
            if key not in best or (row.step_ms is not None and (best[key].step_ms or float("inf")) > row.step_ms):
                best[key] = row
        if pass_no < args.repeat - 1:
            continue
        rows = [best[(row.engine, row.policy, context, batch)] for row in rows]
        base = rows[0] if args.baseline == "transformers" else None
        for row in rows:
            if base and row is not base and base.decode_tokens_per_s and row.decode_tokens_per_s:
                row.baseline_ratio = row.decode_tokens_per_s / base.decode_tokens_per_s
            results.append(row)
            if args.json:
                print(json.dumps({**asdict(row), "shape": args.shape, "dtype": args.dtype, "bandwidth_gbps": gbps,
                                  "tokens": args.tokens, "repeat": args.repeat, "select_every": args.select_every,
                                  "select_chunk": args.select_chunk,
                                  "select_min_ratio": args.select_min_ratio,
                                  "reserve_device": args.reserve_device, "graphs": not args.enforce_eager,
                                  "compile": args.compile,
                                  "torch": torch.__version__}), flush=True)
    if not args.json:
        table = Table(title=f"slam bench decode on {results[0].device} ({args.shape or 'model'}, {args.dtype}, "
                            f"{gbps:.0f} GB/s measured)")
        for column in ("engine", "policy", "context", "batch", "tok/s", "step ms", "roofline ms", "% roofline",
                       "peak GPU MiB", "KV MiB/request", "x baseline"):
            table.add_column(column, justify="right")
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        for r in results:
            table.add_row(r.engine, r.policy, str(r.context), str(r.batch), fmt(r.decode_tokens_per_s, ".1f") + (
                f" ({r.note})" if r.note else ""), fmt(r.step_ms, ".2f"), f"{r.roofline_ms:.2f}",
                fmt(r.roofline_pct, ".0f"), fmt(r.peak_gpu_mib, ".0f"), fmt(r.kv_mib_per_request, ".1f"),
                fmt(r.baseline_ratio, ".1f"))
        Console().print(table)
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results: list[DecodeResult], out: Path) -> None:
    """Tokens/s and peak GPU memory per engine and policy (on CPUs, where there is no GPU memory: the speed
    against the baseline), over the context (one line per batch), or over the batch when the run had one
    context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_batch = len({r.context for r in results}) == 1
    x_of, series_of = (lambda r: r.batch, lambda r: r.context) if by_batch else (lambda r: r.context, lambda r: r.batch)
    gpu = any(r.peak_gpu_mib for r in results)
    right = (lambda r: r.peak_gpu_mib) if gpu else (lambda r: r.baseline_ratio)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lines = 0
    for key in dict.fromkeys((r.engine, r.policy) for r in results):
        for series in sorted({series_of(r) for r in results}):
            rows = [r for r in results if (r.engine, r.policy) == key and series_of(r) == series and r.step_ms]
            if not rows:
                continue
            label = f"{key[0]} {key[1]}" + ("" if by_batch else f", batch {series}")
            style = {"marker": "o", "label": label, "color": f"C{lines % 10}"}  # one colour per line in both panels
            lines += 1
            axes[0].plot([x_of(r) for r in rows], [r.decode_tokens_per_s for r in rows], **style)
            if any(right(r) is not None for r in rows):
                axes[1].plot([x_of(r) for r in rows], [right(r) or 0 for r in rows], **style)
    axes[0].set_ylabel("decode tokens/s (batch total)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("peak GPU MiB" if gpu else "x the baseline's tokens/s (same run)")
    for ax in axes:
        ax.set_xlabel("batch" if by_batch else "context tokens")
        ax.set_xscale("log", base=2 if by_batch else 10)
        ax.grid(alpha=0.3)
    if by_batch:
        axes[0].set_title(f"context {results[0].context} tokens", fontsize=9)
    axes[0].legend(fontsize=7)
    if not gpu:
        axes[1].legend(fontsize=7)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
