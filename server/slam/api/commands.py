"""`slam serve` and `slam bench serve`. The lead's cli.py calls `register(subparsers)`.

Every `serve` flag is a `ServerSettings` field: a flag the user gave overrides the `SLAM_*` environment
variable, which overrides the default, and all of them are validated once, by that class.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

MAIN_UNIX = __import__("time").time()  # when this process reached our code (for restore timings)

from slam.config import ServerSettings

# flag -> (ServerSettings field, help). Values are passed as strings so pydantic does all the checking
# and its errors name the flag, whether the bad value came from a flag or the environment.
SERVE_FLAGS: dict[str, tuple[str, str]] = {
    "--host": ("host", "address to listen on (default 127.0.0.1)"),
    "--port": ("port", "port to listen on (default 8000)"),
    "--model": ("model", "model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)"),
    "--served-model-name": ("served_model_name", "model id clients use (default: the model's name)"),
    "--dtype": ("dtype", "float32, bfloat16, float16, or int8 (dynamic int8 linears, CPU only)"),
    "--device": ("device", "auto, cpu, cuda, cuda:N"),
    "--policy": ("policy", "default cache policy: full, streaming, slam, snapkv, h2o"),
    "--budget": ("budget", "default tokens kept per layer and KV head"),
    "--sink": ("sink", "default first tokens never evicted"),
    "--recent": ("recent", "default window of newest tokens"),
    "--position-mode": ("position_mode", "original or cache"),
    "--max-batch": ("max_batch", "requests decoded together"),
    "--max-queue": ("max_queue", "requests allowed to wait beyond max-batch; more get 429"),
    "--prefill-chunk": ("prefill_chunk", "prompt tokens processed per step"),
    "--max-prompt-tokens": ("max_prompt_tokens", "longest prompt accepted (400 beyond)"),
    "--reserve-device": ("reserve_device", "where slam keeps evicted tokens: auto, cuda, cpu"),
    "--reserve-dtype": ("reserve_dtype", "bfloat16 or int8 (per-token scales) for evicted tokens"),
    "--enforce-eager": ("enforce_eager", "true: no CUDA graphs for decode steps"),
    "--api-key-file": ("api_key_file", "file with one API key per line; requests must send one"),
    "--s3-endpoint": ("s3_endpoint", "S3 host:port for checkpoints (none: checkpointing off); "
                      "credentials from SLAM_S3_ACCESS_KEY / SLAM_S3_SECRET_KEY"),
    "--s3-bucket": ("s3_bucket", "checkpoint bucket (default slam)"),
    "--s3-prefix": ("s3_prefix", "object prefix of checkpoints (default checkpoints)"),
    "--s3-secure": ("s3_secure", "true: HTTPS to the S3 endpoint"),
    "--slot": ("slot", "checkpoint slot this replica writes (default 0)"),
    "--slot-epoch": ("slot_epoch", "fencing epoch of the slot, raised by the operator at every failover"),
    "--advertise-url": ("advertise_url", "URL other replicas proxy resumed streams to (default http://HOST:PORT)"),
    "--checkpoint-interval": ("checkpoint_interval", "generated tokens between checkpoints of a request (16)"),
    "--restore-slot": ("restore_slot", "resume the requests checkpointed in this slot before admitting new ones"),
}
FIELD_TO_FLAG = {field: flag for flag, (field, _) in SERVE_FLAGS.items()}


def explain(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        field = next((str(x) for x in e["loc"] if isinstance(x, str)), "")
        message = str(e["msg"]).removeprefix("Value error, ")
        flag = FIELD_TO_FLAG.get(field)
        parts.append(f"{flag} (SLAM_{field.upper()}): {message}" if flag else message)
    return "; ".join(parts)


def settings_from(args: argparse.Namespace) -> ServerSettings:
    given = {field: getattr(args, field) for field, _ in SERVE_FLAGS.values() if getattr(args, field) is not None}
    return ServerSettings(**given)


def cmd_serve(args: argparse.Namespace) -> int:
    from slam.model import ModelError

    try:
        settings = settings_from(args)
    except ValidationError as exc:
        print(f"slam serve: {explain(exc)}", file=sys.stderr)
        return 2
    from slam.api.failover import EpochConflict, check_epoch
    from slam.api.server import serve
    from slam.engine.engine import LLMEngine

    try:
        check_epoch(settings)  # fencing: before the model loads, so a second pod for a slot fails fast
    except EpochConflict as exc:
        print(f"slam serve: --slot-epoch (SLAM_SLOT_EPOCH): {exc}", file=sys.stderr)
        return 2

    import time

    t0, load_start_unix = time.monotonic(), time.time()
    try:
        # Loaded before listening: /ready then only waits for the engine loop, and a bad --model fails fast.
        engine = LLMEngine(settings.engine_config())
    except ModelError as exc:
        print(f"slam serve: --model: {exc}", file=sys.stderr)
        return 2
    print(f"slam: serving {settings.served_model_name or engine.loaded.name} on http://{settings.host}:{settings.port}",
          file=sys.stderr, flush=True)
    timings = {"main_unix": MAIN_UNIX, "load_start_unix": load_start_unix, "model_load_s": time.monotonic() - t0}
    try:
        serve(settings, engine, timings)
    except EpochConflict as exc:  # another pod claimed the slot while this one was loading
        print(f"slam serve: --slot-epoch (SLAM_SLOT_EPOCH): {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from slam.bench.report import print_json, print_table
    from slam.bench.serve import BenchConfig, BenchError, run_bench

    try:
        config = BenchConfig(url=args.url, concurrency=args.concurrency, requests=args.requests,
                             prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, api_key=args.api_key,
                             model=args.model, progress=not args.no_progress)
    except ValidationError as exc:
        print(f"slam bench serve: {'; '.join(str(e['loc'][0]) + ': ' + e['msg'] for e in exc.errors())}",
              file=sys.stderr)
        return 2
    try:
        result = run_bench(config)
    except BenchError as exc:
        print(f"slam bench serve: {exc}", file=sys.stderr)
        return 1
    print_json(result) if args.json else print_table(result)
    return 0 if result.failed == 0 else 1


def register(subparsers) -> None:
    """Add `serve` and `bench serve` to the `slam` command's subparsers."""
    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                                  description="Every flag can also be set as the environment variable SLAM_<FLAG>.")
    for flag, (field, help_text) in SERVE_FLAGS.items():
        serve.add_argument(flag, dest=field, default=None, metavar=field.upper(), help=help_text)
    serve.set_defaults(func=cmd_serve)

    bench = subparsers.add_parser("bench", help="benchmarks")
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
    bs.set_defaults(func=cmd_bench_serve)
    from slam.bench.failover import add_parser as add_failover

    add_failover(bench_sub)
    from slam.bench.decode import add_parser as add_decode

    add_decode(bench_sub)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m slam.api.commands ...`), used by the tests."""
    parser = argparse.ArgumentParser(prog="slam")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
