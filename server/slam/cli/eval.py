"""`slam eval niah`, `ppl`, `ruler` and `longbench`: quality of the cache policies.

The ruler and longbench logic lives in slam.eval; this module builds their parsers and engines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slam.cli.common import Parser, UsageError, cache_config
from slam.config import CacheConfig, EngineConfig
from slam.eval.commands import add_compare_flags
from slam.eval.longbench_command import add_longbench_flags
from slam.eval.ruler_command import add_ruler_flags
from slam.flags import add_cache_flags, add_model_flags, add_selection_flags, positive_list, selection


def run_niah(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from slam.engine.engine import LLMEngine
    from slam.eval.commands import check_compare, pool_size
    from slam.eval.niah import case_dict, run_niah
    from slam.eval.niah_compare import niah_kvpress_cases

    caches = [cache_config(args, p, b) for p in args.policies for b in ([None] if p == "full" else args.budgets)]
    python = check_compare(args, LLMEngine)
    # A niah prompt stays under its length; the margin covers the chat template and the answer.
    engine = EvalEngines(args)(caches[0], 1, pool_size(caches, max(args.lengths) + 128))
    total = len(caches) * len(args.lengths) * len(args.depths) * args.seeds
    cases = []
    with tqdm(total=total, desc="niah", file=sys.stderr, disable=args.json and not sys.stderr.isatty()) as bar:
        for case in run_niah(engine, caches, args.lengths, args.depths, args.seeds, args.needle, args.question,
                             question_unseen=args.question_unseen):
            cases.append(case)
            bar.update()
            if args.json:
                print(json.dumps(case_dict(case)), flush=True)
    for case in niah_kvpress_cases(args, engine, engine.loaded, python) if python else []:
        cases.append(case)
        if args.json:
            print(json.dumps(case_dict(case)), flush=True)
    if not args.json:
        setting = "unseen" if args.question_unseen else "known"
        table = Table(title=f"needle in a haystack, question {setting}: found / cases")
        table.add_column("policy")
        table.add_column("budget")
        for length in args.lengths:
            table.add_column(f"{length} tokens", justify="right")
        for policy, budget in dict.fromkeys((c.policy, c.budget) for c in cases):
            row = [policy, str(budget or "-")]
            for length in args.lengths:
                hits = [c.found for c in cases if c.policy == policy and c.budget == budget and c.length == length]
                row.append(f"{sum(hits)}/{len(hits)}")
            table.add_row(*row)
        Console().print(table)
    if args.plot:
        from slam.eval.plots import niah_heatmap

        niah_heatmap(cases, args.plot)
    return 0


def run_ppl(args) -> int:
    from tqdm import tqdm

    from slam.eval.ppl import run_ppl

    caches = [cache_config(args, p) for p in args.policies]
    engines = EvalEngines(args)
    results = []
    for cache in caches:
        # A full cache holds the whole text; the others take their own budget.
        engine = engines(cache, 1, args.tokens + 8 if cache.policy == "full" else None)
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


def validate(args) -> None:
    from slam.cache import POLICIES

    for policy in args.policies:
        if policy not in POLICIES:
            raise UsageError(f"slam: error: --policies: unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if getattr(args, "needle", "x") is None or getattr(args, "question", "x") is None:
        from slam.eval import niah

        args.needle = args.needle or niah.DEFAULT_NEEDLE
        args.question = args.question or niah.DEFAULT_QUESTION
    if getattr(args, "needle", None) and "{key}" not in args.needle:
        raise UsageError("slam: error: --needle: the template must contain {key}")


def checked(run):
    def call(args) -> int:
        from slam.eval.commands import EvalUsageError

        validate(args)
        try:
            return run(args)
        except EvalUsageError as e:
            raise UsageError(f"slam: error: {e}") from None

    return call


class EvalEngines:
    """The model, loaded once, and engines over it sized for each evaluation's caches and prompts."""

    def __init__(self, args):
        self.args = args
        self._loaded = None

    @property
    def loaded(self):
        if self._loaded is None:
            from slam.model import load_model

            self._loaded = load_model(self.args.model, self.args.dtype, self.args.device)
        return self._loaded

    def __call__(self, cache: CacheConfig, max_batch: int, max_budget: int | None):
        from slam.engine.engine import LLMEngine

        a = self.args
        config = EngineConfig(model=a.model, dtype=a.dtype, device=a.device, max_batch=max_batch,
                              prefill_chunk=a.prefill_chunk, cache=cache, max_budget=max_budget, **selection(a))
        return LLMEngine(config, self.loaded)


def run_ruler(args) -> int:
    from slam.eval.ruler_command import ruler_command

    caches = [cache_config(args, p, b) for p in args.policies for b in ([None] if p == "full" else args.budgets)]
    return ruler_command(args, caches, EvalEngines(args))


def run_longbench(args) -> int:
    from slam.eval.longbench_command import longbench_command

    caches = [cache_config(args, p) for p in args.policies]
    return longbench_command(args, caches, EvalEngines(args))


def add_engine_flags(p) -> None:
    """The cache, selection and model flags every evaluation takes (one policy list of its own)."""
    add_cache_flags(p, with_policy=False)
    add_selection_flags(p)
    add_model_flags(p)


def register(sub) -> None:
    ev = sub.add_parser("eval", help="quality evaluations").add_subparsers(dest="eval", required=True,
                                                                          parser_class=Parser)
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
    add_compare_flags(niah)
    add_engine_flags(niah)
    niah.set_defaults(func=checked(run_niah))

    ppl = ev.add_parser("ppl", help="perplexity over long text, per policy")
    ppl.add_argument("--policies", type=positive_list(str), default=["full", "streaming", "slam"])
    ppl.add_argument("--tokens", type=int, default=2000)
    ppl.add_argument("--window", type=int, default=128, help="tokens per point of the curve")
    ppl.add_argument("--json", action="store_true")
    ppl.add_argument("--plot", type=Path, default=None)
    add_engine_flags(ppl)
    ppl.set_defaults(func=checked(run_ppl))

    ruler = ev.add_parser("ruler", help="RULER-style synthetic tasks over the essays (needles, variables, words)")
    add_ruler_flags(ruler)
    add_engine_flags(ruler)
    ruler.set_defaults(func=checked(run_ruler))

    longbench = ev.add_parser("longbench", help="LongBench's English tasks from your JSONL files, official metrics")
    add_longbench_flags(longbench)
    add_engine_flags(longbench)
    longbench.set_defaults(func=checked(run_longbench))
