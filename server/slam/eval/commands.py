"""The logic of `slam eval longbench`, `slam eval ruler` and the niah comparison flags.

slam.cli owns the parsers and the engine's construction; these functions get the parsed arguments and an
engine factory, and raise `EvalUsageError` (one line naming the flag) for input they cannot use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Protocol

from slam.eval.kvpress_compare import DEFAULT_PRESSES, KvpressError, KvpressJob, kvpress_python, run_kvpress
from slam.eval.split import EngineHookMissing, SplitPrompt, require_boundaries
from slam.flags import positive_list


class Engines(Protocol):
    """What slam.cli gives an evaluation: the loaded model, and engines over it."""

    @property
    def loaded(self): ...  # LoadedModel: .tokenizer, .path, .device

    def __call__(self, cache, max_batch: int, max_budget: int | None): ...  # -> LLMEngine


def pool_size(caches: list, longest_request: int) -> int:
    """Cache columns per request an engine needs: the largest budget and, for `full`, the longest request
    (prompt plus new tokens)."""
    sizes = [c.budget for c in caches if c.budget is not None]
    if any(c.budget is None for c in caches):
        sizes.append(longest_request)
    return max(sizes)


class EvalUsageError(Exception):
    """Input an evaluation cannot use; the message starts with the flag."""


def add_compare_flags(p: argparse.ArgumentParser) -> None:
    """--question-unseen and --compare kvpress, shared by niah and ruler."""
    p.add_argument("--question-unseen", action="store_true",
                   help="compress the context first, then append the question (kvpress's leaderboard setting)")
    p.add_argument("--compare", choices=["kvpress"], default=None,
                   help="also run the same prompts through kvpress's presses at the same budgets")
    p.add_argument("--kvpress-python", default=None,
                   help="Python of an environment with kvpress installed (default: $SLAM_KVPRESS_PYTHON)")
    p.add_argument("--presses", type=positive_list(str), default=DEFAULT_PRESSES, help=", ".join(DEFAULT_PRESSES))


def check_compare(args, engine) -> str | None:
    """Fail before any work when the question-unseen hook or kvpress's Python is missing.

    `engine` may be the engine class: the hook is a parameter of its `add_request`."""
    if args.question_unseen:
        try:
            require_boundaries(engine)
        except EngineHookMissing as e:
            raise EvalUsageError(f"--question-unseen: {e}") from None
    if args.compare != "kvpress":
        return None
    python = kvpress_python(args.kvpress_python)
    if not python:
        raise EvalUsageError("--kvpress-python: --compare kvpress needs the Python of a kvpress environment "
                             "(or SLAM_KVPRESS_PYTHON)")
    if not Path(python).is_file():
        raise EvalUsageError(f"--kvpress-python: {python} does not exist")
    unknown = [p for p in args.presses if p not in DEFAULT_PRESSES]
    if unknown:
        raise EvalUsageError(f"--presses: unknown press {unknown[0]!r}; choose from {', '.join(DEFAULT_PRESSES)}")
    if getattr(args, "dtype", "float32") == "int8":
        raise EvalUsageError("--dtype: kvpress runs float32, bfloat16 or float16 models, not int8")
    return python


def kvpress_answers(args, loaded, python: str, jobs: list[KvpressJob], budgets: list[int]) -> dict:
    """The kvpress runner's output for the jobs (on the same model files and device); prints the versions
    that ran on stderr."""
    try:
        out = run_kvpress(python, loaded.path, jobs, budgets, args.presses, args.question_unseen,
                          device=str(loaded.device), dtype=args.dtype)
    except KvpressError as e:
        raise EvalUsageError(f"--kvpress-python: {e}") from None
    versions = ", ".join(f"{k} {v}" for k, v in out["versions"].items())
    print(f"kvpress comparison ran with {versions}", file=sys.stderr)
    failed = [r for r in out["results"] if "error" in r]
    if failed:  # scored as 0 and shown in the output, but said here too so that nobody misses it
        print(f"kvpress: {len(failed)} of {len(out['results'])} runs failed, e.g. {failed[0]['press']}: "
              f"{failed[0]['error']}", file=sys.stderr)
    return out


def emit(row: dict, json_lines: bool) -> None:
    if json_lines:
        print(json.dumps(row), flush=True)


def split_jobs(prompts: list[tuple[str, SplitPrompt, int]]) -> list[KvpressJob]:
    return [KvpressJob(i, p, n) for i, p, n in prompts]
