"""`slam eval ruler`: the RULER-style tasks per policy, budget and length, optionally beside kvpress."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slam.eval.commands import (
    Engines,
    EvalUsageError,
    add_compare_flags,
    check_compare,
    emit,
    kvpress_answers,
    pool_size,
)
from slam.eval.kvpress_compare import KvpressJob
from slam.eval.ruler import TASKS, RulerSample
from slam.flags import positive_list


def add_ruler_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=positive_list(str), default=list(TASKS), help=", ".join(TASKS))
    p.add_argument("--policies", type=positive_list(str), default=["full", "streaming", "slam"])
    p.add_argument("--budgets", type=positive_list(int), default=[256])
    p.add_argument("--lengths", type=positive_list(int), default=[2000], help="context lengths in tokens")
    p.add_argument("--seeds", type=int, default=1, help="samples per task and length")
    p.add_argument("--json", action="store_true", help="one JSON object per case, then the summary")
    p.add_argument("--plot", type=Path, default=None, help="PNG of scores by length, one panel per task")
    add_compare_flags(p)


def validate(args) -> None:
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise EvalUsageError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    if not args.tasks:
        raise EvalUsageError("--tasks: give at least one task")
    if args.seeds < 1:
        raise EvalUsageError("--seeds: must be at least 1")
    bad = [n for n in args.lengths if n < 64]
    if bad or not args.lengths:
        raise EvalUsageError(f"--lengths: each length must be at least 64 tokens, got {bad[0] if bad else 'none'}")
    if any(b < 1 for b in args.budgets):
        raise EvalUsageError("--budgets: each budget must be at least 1")


def kvpress_cases(args, loaded, python: str, samples: list[RulerSample]) -> list:
    from slam.eval.ruler_run import RulerCase, setting_name

    jobs = [KvpressJob(str(i), s.prompt, s.max_tokens) for i, s in enumerate(samples)]
    out = kvpress_answers(args, loaded, python, jobs, args.budgets)
    cases = []
    for row in out["results"]:
        sample = samples[int(row["id"])]
        answer = row.get("answer", "")
        cases.append(RulerCase(
            task=sample.task, policy=f"kvpress:{row['press']}", budget=row["budget"], length=sample.length,
            seed=sample.seed, setting=setting_name(args.question_unseen), prompt_tokens=row["context_tokens"],
            answers=sample.answers, output=answer if "error" not in row else f"error: {row['error']}",
            score=sample.score(answer) if "error" not in row else 0.0,
        ))
    return cases


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    for setting, methods in summary.items():
        lengths = sorted({n for m in methods.values() for n in m}, key=int)
        tasks = list(dict.fromkeys(t for m in methods.values() for row in m.values() for t in row))
        table = Table(title=f"RULER-style tasks, question {setting}: string-match score (0-100)")
        table.add_column("method")
        table.add_column("length", justify="right")
        for task in tasks:
            table.add_column(task, justify="right")
        for method, rows in methods.items():
            for n in lengths:
                table.add_row(method, n, *(f"{rows[n].get(t, float('nan')):.1f}" for t in tasks))
        Console().print(table)


def ruler_command(args, caches, engines: Engines) -> int:
    from tqdm import tqdm

    from slam.engine.engine import LLMEngine
    from slam.eval.ruler_run import case_dict, ruler_samples, run_ruler, summarize
    from slam.eval.split import encode_split

    validate(args)
    python = check_compare(args, LLMEngine)
    tokenizer = engines.loaded.tokenizer
    samples = ruler_samples(tokenizer, args.tasks, args.lengths, args.seeds)
    longest = max(len(encode_split(tokenizer, s.prompt, args.question_unseen).ids) + s.max_tokens for s in samples)
    engine = engines(caches[0], 1, pool_size(caches, longest))
    cases = []
    quiet = args.json and not sys.stderr.isatty()
    with tqdm(total=len(samples) * len(caches), desc="ruler", file=sys.stderr, disable=quiet) as bar:
        for case in run_ruler(engine, caches, samples, args.question_unseen):
            cases.append(case)
            bar.update()
            emit(case_dict(case), args.json)
    if python:
        for case in kvpress_cases(args, engines.loaded, python, samples):
            cases.append(case)
            emit(case_dict(case), args.json)
    summary = summarize(cases)
    emit({"summary": summary}, args.json)
    if not args.json:
        print_table(summary)
    if args.plot:
        from slam.eval.plots import ruler_lines

        ruler_lines(cases, args.plot)
    return 0
