"""`slam serve`: one flag per `ServerSettings` field, generated from the class (its description is the help).

A flag the user gave overrides the `SLAM_*` environment variable, which overrides the default; all of them
are validated once, by that class, and an error names the flag and the variable.
"""

from __future__ import annotations

import argparse
import sys
import time

from pydantic import SecretStr, ValidationError

from slam.cli.common import explain
from slam.config import ServerSettings

MAIN_UNIX = time.time()  # when this process reached our code (for restore timings)


def flag_of(field: str) -> str:
    return "--" + field.replace("_", "-")


def flag_fields() -> list[str]:
    """Every settings field but the secrets, which come only from the environment (flags show in `ps`)."""
    return [name for name, f in ServerSettings.model_fields.items() if f.annotation is not SecretStr]


FIELD_TO_FLAG = {name: flag_of(name) for name in flag_fields()}


def settings_from(args: argparse.Namespace) -> ServerSettings:
    # Values stay strings here, so pydantic does all the checking, for flags and the environment alike.
    given = {field: getattr(args, field) for field in FIELD_TO_FLAG if getattr(args, field, None) is not None}
    return ServerSettings(**given)


def run(args: argparse.Namespace) -> int:
    from slam.model import ModelError

    try:
        settings = settings_from(args)
    except ValidationError as exc:
        print(f"slam serve: {explain(exc, FIELD_TO_FLAG, env=True)}", file=sys.stderr)
        return 2
    from slam.api.failover import EpochConflict, check_epoch
    from slam.api.server import serve
    from slam.engine.engine import LLMEngine

    try:
        check_epoch(settings)  # fencing: before the model loads, so a second pod for a slot fails fast
    except EpochConflict as exc:
        print(f"slam serve: --slot-epoch (SLAM_SLOT_EPOCH): {exc}", file=sys.stderr)
        return 2

    t0, load_start_unix = time.monotonic(), time.time()
    try:
        # Loaded before listening: /ready then only waits for the engine loop, and a bad --model fails fast.
        engine = LLMEngine(settings.engine_config())
    except ModelError as exc:
        print(f"slam serve: --model (SLAM_MODEL): {exc}", file=sys.stderr)
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


def register(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Every flag can also be set as the environment variable SLAM_<FLAG> "
                                       "(SLAM_MAX_BATCH for --max-batch). Credentials only from the environment: "
                                       "SLAM_S3_ACCESS_KEY, SLAM_S3_SECRET_KEY, SLAM_REPLICA_TOKEN.")
    for name, flag in FIELD_TO_FLAG.items():
        field = ServerSettings.model_fields[name]
        extra = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        default = "" if field.default is None else f" (default {field.default})"
        serve.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                           help=f"{field.description or ''}{default}".replace("%", "%%"), **extra)
    serve.set_defaults(func=run)
