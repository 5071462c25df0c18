"""`slam` command line: generate, eval, serve, bench.

Bad input ends with one line on stderr that names the problem, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from slam.config import CacheConfig, EngineConfig
from slam.model import ModelError

FIELD_FLAGS = {"policy": "--policy", "budget": "--budget", "sink": "--sink", "recent": "--recent",
               "position_mode": "--position-mode", "max_tokens": "--max-tokens", "temperature": "--temperature",
               "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed", "max_batch": "--max-batch",
               "prefill_chunk": "--prefill-chunk"}


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage too; one line is easier to read
        raise UsageError(f"{self.prog}: error: {message}")


def explain(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        field = next((str(x) for x in e["loc"] if isinstance(x, str)), "")
        if not field:  # A check across fields: name the first field its message mentions.
            mentioned = [(message.find(f), f) for f in FIELD_FLAGS if f in message]
            field = min(mentioned)[1] if mentioned else ""
        flag = FIELD_FLAGS.get(field, "")
        parts.append(f"{flag}: {message}" if flag else message)
    return "; ".join(parts)


def positive_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")

    return parse


def add_cache_flags(p: argparse.ArgumentParser, with_policy: bool = True) -> None:
    if with_policy:
        p.add_argument("--policy", default="slam", help="full, streaming, slam, snapkv, h2o")
    p.add_argument("--budget", type=int, default=256, help="tokens kept per layer and KV head")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--position-mode", choices=["original", "cache"], default="original",
                   help="'cache' numbers positions inside the cache and can run past the trained length")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                   help="int8: dynamic int8 linear layers (CPU only)")
    p.add_argument("--prefill-chunk", type=int, default=512)


def cache_config(args, policy: str | None = None, budget: int | None = None) -> CacheConfig:
    policy = policy or args.policy
    budget = budget or getattr(args, "budget", None)
    return CacheConfig(policy=policy, budget=None if policy == "full" else budget, sink=args.sink,
                       recent=args.recent, position_mode=args.position_mode)


def engine_from(args, cache: CacheConfig, max_batch: int = 8):
    from slam.engine.engine import LLMEngine

    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_batch=max_batch,
                          prefill_chunk=args.prefill_chunk, cache=cache)
    return LLMEngine(config)


# --- generate ------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from slam.engine.sequence import SamplingParams

    cache = cache_config(args)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos)
    engine = engine_from(args, cache)
    prompt = engine.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else engine.encode(args.prompt)

    cache_tokens = 0

    def show(out) -> None:
        nonlocal cache_tokens
        cache_tokens = out.cache_tokens
        sys.stdout.write(out.text)
        sys.stdout.flush()

    [seq] = engine.generate([prompt], sampling, cache, on_output=show)
    sys.stdout.write("\n")
    if args.stats:
        print(json.dumps({"prompt_tokens": len(seq.prompt_ids), "generated_tokens": len(seq.output_ids),
                          "finish_reason": seq.finish_reason, "replacements": seq.replacements,
                          "cache_tokens": cache_tokens}), file=sys.stderr)
    return 0


# --- eval ------------------------------------------------------------------------------------------------
def cmd_eval_niah(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from slam.eval.niah import case_dict, run_niah

    caches = [cache_config(args, p, b) for p in args.policies for b in ([None] if p == "full" else args.budgets)]
    engine = engine_from(args, caches[0], max_batch=1)
    total = len(caches) * len(args.lengths) * len(args.depths) * args.seeds
    cases = []
    with tqdm(total=total, desc="niah", file=sys.stderr, disable=args.json and not sys.stderr.isatty()) as bar:
        for case in run_niah(engine, caches, args.lengths, args.depths, args.seeds, args.needle, args.question):
            cases.append(case)
            bar.update()
            if args.json:
                print(json.dumps(case_dict(case)), flush=True)
    if not args.json:
        table = Table(title="needle in a haystack: found / cases")
        table.add_column("policy")
        table.add_column("budget")
        for length in args.lengths:
            table.add_column(f"{length} tokens", justify="right")
        for cache in caches:
            row = [cache.policy, str(cache.budget or "-")]
            for length in args.lengths:
                hits = [c.found for c in cases if c.policy == cache.policy and c.budget == cache.budget and c.length == length]
                row.append(f"{sum(hits)}/{len(hits)}")
            table.add_row(*row)
        Console().print(table)
    if args.plot:
        from slam.eval.plots import niah_heatmap

        niah_heatmap(cases, args.plot)
    return 0


def cmd_eval_ppl(args) -> int:
    from tqdm import tqdm

    from slam.eval.ppl import run_ppl

    caches = [cache_config(args, p) for p in args.policies]
    engine = engine_from(args, caches[0], max_batch=1)
    results = []
    for cache in caches:
        with tqdm(total=args.tokens, desc=f"ppl {cache.policy}", file=sys.stderr) as bar:
            result = run_ppl(engine, cache, args.tokens, on_token=bar.update)
        results.append(result)
        if args.json:
            print(json.dumps({"policy": result.policy, "budget": result.budget, "tokens": result.tokens,
                              "ppl": result.ppl, "max_cache_tokens": result.max_cache_tokens,
                              "curve": result.curve(args.window)}), flush=True)
        else:
            print(f"{result.policy:10s} budget={result.budget or '-':>5} tokens={result.tokens} "
                  f"ppl={result.ppl:.3f} max_cache={result.max_cache_tokens}")
    if args.plot:
        from slam.eval.plots import ppl_curves

        ppl_curves(results, args.plot, args.window)
    return 0


# --- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="slam", description="LLM serving with a compressed, bounded KV cache")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stats", action="store_true", help="print token counts as JSON on stderr")
    add_cache_flags(gen)
    add_model_flags(gen)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="quality evaluations").add_subparsers(dest="eval", required=True, parser_class=Parser)
    niah = ev.add_parser("niah", help="needle in a haystack over the Paul Graham essays")
    niah.add_argument("--policies", type=positive_list(str), default=["full", "streaming", "slam"])
    niah.add_argument("--budgets", type=positive_list(int), default=[256])
    niah.add_argument("--lengths", type=positive_list(int), default=[2000])
    niah.add_argument("--depths", type=positive_list(float), default=[0.1, 0.5, 0.9])
    niah.add_argument("--seeds", type=int, default=1)
    niah.add_argument("--needle", default=None, help="needle template with {key}")
    niah.add_argument("--question", default=None)
    niah.add_argument("--json", action="store_true")
    niah.add_argument("--plot", type=Path, default=None)
    add_cache_flags(niah, with_policy=False)
    add_model_flags(niah)
    niah.set_defaults(func=cmd_eval_niah)

    ppl = ev.add_parser("ppl", help="perplexity over long text, per policy")
    ppl.add_argument("--policies", type=positive_list(str), default=["full", "streaming", "slam"])
    ppl.add_argument("--tokens", type=int, default=2000)
    ppl.add_argument("--window", type=int, default=128, help="tokens per point of the curve")
    ppl.add_argument("--json", action="store_true")
    ppl.add_argument("--plot", type=Path, default=None)
    add_cache_flags(ppl, with_policy=False)
    add_model_flags(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)

    __import__("slam_operator.cli", fromlist=["register"]).register(sub)  # `slam operator` (operator/slam_operator)
    try:
        from slam.api.commands import register
    except ImportError:  # The serving extra is part of the default install; this guards partial checkouts.
        pass
    else:
        register(sub)
    return parser


def validate(args) -> None:
    from slam.cache import POLICIES

    for policy in getattr(args, "policies", None) or []:
        if policy not in POLICIES:
            raise UsageError(f"slam: error: --policies: unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    for name in ("needle", "question"):
        if getattr(args, name, "x") is None:
            from slam.eval import niah

            setattr(args, name, niah.DEFAULT_NEEDLE if name == "needle" else niah.DEFAULT_QUESTION)
    if getattr(args, "needle", None) and "{key}" not in args.needle:
        raise UsageError("slam: error: --needle: the template must contain {key}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        return args.func(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"slam: error: {explain(e)}", file=sys.stderr)
        return 2
    except ModelError as e:
        print(f"slam: error: --model: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
