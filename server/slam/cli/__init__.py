"""The `slam` command line: one module per command group (generate, eval, serve, bench).

Bad input ends with one line on stderr that names the flag, and exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys

# torch backs its large CPU allocations (weights, pool, reserve) with transparent huge pages when this is set. It
# is read once, at torch's first allocation, so it is set before anything imports torch. A CPU decode step reads
# the reserve at rows scattered over hundreds of megabytes, and huge pages spare those reads most of their TLB
# misses: 3-4% faster steps at 8K (docs/benchmarks.md). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from pydantic import ValidationError

from slam.cli import bench, eval, generate, serve
from slam.cli.common import FIELD_FLAGS, Parser, UsageError, explain
from slam.errors import ModelError
from slam.flags import add_model_flags, positive_list  # noqa: F401  (the flags every command shares)

GROUPS = [generate, eval, serve, bench]
# Command groups of other packages: a module with `register(subparsers)`, added when it is installed.
# `slam operator` is registered here by operator/slam_operator (its module adds the `operator` command).
PLUGINS = {"slam_operator.cli": "operator"}


def build_parser() -> Parser:
    parser = Parser(prog="slam", description="LLM serving with a compressed, bounded KV cache")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in GROUPS:
        group.register(sub)
    for name, command in PLUGINS.items():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # not installed
            # Installed, but a dependency of its extra is missing: the command says so when it is used.
            sub.add_parser(command, help=f"(needs the {command} extra)").set_defaults(func=missing(command, exc.name))
            continue
        module.register(sub)
    return parser


def missing(command: str, module: str | None):
    def run(_args) -> int:
        raise UsageError(f"slam {command}: the module {module!r} is missing; install the extra: "
                         f"pip install 'slam-serve[{command}]'")

    return run


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"slam: error: {explain(e, FIELD_FLAGS)}", file=sys.stderr)
        return 2
    except ModelError as e:
        print(f"slam: error: --model: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
