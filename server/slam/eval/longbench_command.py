"""`slam eval longbench`: LongBench's English tasks from the user's JSONL files, per policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slam.eval.commands import Engines, EvalUsageError, emit, pool_size
from slam.flags import positive_list
from slam.eval.longbench_tasks import TASKS


def add_longbench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True,
                   help="directory of LongBench JSONL files named <task>.jsonl or <task>_e.jsonl")
    p.add_argument("--tasks", type=positive_list(str), default=None, help=f"default: every task with a file; {', '.join(TASKS)}")
    p.add_argument("--policies", type=positive_list(str), default=["full", "streaming", "slam"])
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt tokens kept, cut in the middle (default: the model's trained length less 512)")
    p.add_argument("--limit", type=int, default=None, help="first N records of each task")
    p.add_argument("--json", action="store_true", help="one JSON object per sample, then the summary")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the scores per task and policy")


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="LongBench (official metrics, 0-100)")
    table.add_column("task")
    for method in summary:
        table.add_column(method, justify="right")
    tasks = list(dict.fromkeys(t for m in summary.values() for t in m["tasks"]))
    for task in tasks:
        table.add_row(task, *(f"{m['tasks'].get(task, float('nan')):.2f}" for m in summary.values()))
    table.add_row("average", *(f"{m['average']:.2f}" for m in summary.values()))
    Console().print(table)


def longbench_command(args, caches, engines: Engines) -> int:
    from tqdm import tqdm

    from slam.eval.longbench import (
        LongBenchDataError,
        default_max_length,
        prepare,
        read_records,
        resolve_tasks,
        run_longbench,
        sample_dict,
        summarize,
    )

    if args.max_length is not None and args.max_length < 16:
        raise EvalUsageError("--max-length: must be at least 16 tokens")
    if args.limit is not None and args.limit < 1:
        raise EvalUsageError("--limit: must be at least 1")
    try:
        files = resolve_tasks(args.data, args.tasks)
        for path in files.values():
            read_records(path, args.limit)  # every file is checked before the model loads
        max_length = args.max_length or default_max_length(engines.loaded)
        tasks = prepare(engines.loaded.tokenizer, files, max_length, args.limit)
    except LongBenchDataError as e:
        flag = "--tasks" if str(e).startswith(("unknown task", "task ")) else "--data"
        raise EvalUsageError(f"{flag}: {e}") from None
    engine = engines(caches[0], 8, pool_size(caches, max(t.longest_request for t in tasks)))
    samples = []
    quiet = args.json and not sys.stderr.isatty()
    with tqdm(desc="longbench", file=sys.stderr, disable=quiet) as bar:
        for sample in run_longbench(engine, caches, tasks):
            samples.append(sample)
            bar.update()
            emit(sample_dict(sample), args.json)
    summary = summarize(samples)
    emit({"summary": summary, "max_length": max_length}, args.json)
    if not args.json:
        print_table(summary)
    if args.plot:
        from slam.eval.plots import longbench_bars

        longbench_bars(summary, args.plot)
    return 0
