"""Printing a bench result: a rich table for people, one JSON object for scripts."""

from __future__ import annotations

import json

from slam.bench.serve import BenchResult

COLUMNS = [("concurrency", "concurrency"), ("requests", "requests"), ("failed", "failed"),
           ("output_tokens_per_s", "output tok/s"), ("requests_per_s", "req/s"),
           ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
           ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms")]


def print_json(result: BenchResult) -> None:
    print(json.dumps(result.summary()), flush=True)


def print_table(result: BenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result.summary()
    table = Table(title=f"slam bench serve: {s['url']}, prompt {s['prompt_tokens']} tokens, "
                        f"{s['max_tokens']} output tokens")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    table.add_row(*("-" if s[key] is None else str(s[key]) for key, _ in COLUMNS))
    console = Console()
    if not console.is_terminal:  # piped into a file: do not squeeze the columns to 80 characters
        console = Console(width=160)
    console.print(table)
    for error in s["errors"]:
        Console(stderr=True).print(f"error: {error}")
