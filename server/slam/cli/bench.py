"""`slam bench serve|failover|decode`. Each bench module that has its own flags adds its subcommand."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError


def run_serve(args: argparse.Namespace) -> int:
    from slam.bench.report import print_json, print_table
    from slam.bench.serve import BenchConfig, BenchError, run_bench

    try:
        config = BenchConfig(url=args.url, concurrency=args.concurrency, requests=args.requests,
                             prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, api_key=args.api_key,
                             model=args.model, progress=not args.no_progress)
    except ValidationError as exc:
        print(f"slam bench serve: {'; '.join('--' + str(e['loc'][0]).replace('_', '-') + ': ' + e['msg'] for e in exc.errors())}",
              file=sys.stderr)
        return 2
    try:
        result = run_bench(config)
    except BenchError as exc:
        print(f"slam bench serve: {exc}", file=sys.stderr)
        return 1
    print_json(result) if args.json else print_table(result)
    return 0 if result.failed == 0 else 1


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=type(bench))
    bs = bench_sub.add_parser("serve", help="load a running server with concurrent streaming requests")
    bs.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    bs.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    bs.add_argument("--requests", type=int, default=32, help="requests in total")
    bs.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens")
    bs.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    bs.add_argument("--model", default=None, help="model id (default: the server's first model)")
    bs.add_argument("--api-key", default=None, help="API key (default: $SLAM_API_KEY)")
    bs.add_argument("--json", action="store_true", help="print the results as JSON")
    bs.add_argument("--no-progress", action="store_true", help="no progress bar")
    bs.set_defaults(func=run_serve)
    from slam.bench.decode_cli import add_parser as add_decode
    from slam.bench.failover import add_parser as add_failover

    add_failover(bench_sub)
    add_decode(bench_sub)
