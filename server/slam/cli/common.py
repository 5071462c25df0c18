"""What every `slam` command shares: the parser class, one-line usage errors, and naming the flag of a
pydantic error."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from slam.config import CacheConfig, EngineConfig

# Field names of the engine's settings -> the flags of `generate` and `eval` that set them.
FIELD_FLAGS = {"policy": "--policy", "budget": "--budget", "sink": "--sink", "recent": "--recent",
               "position_mode": "--position-mode", "max_tokens": "--max-tokens", "temperature": "--temperature",
               "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed", "max_batch": "--max-batch",
               "prefill_chunk": "--prefill-chunk"}


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage too; one line is easier to read
        raise UsageError(f"{self.prog}: error: {message}")


def explain(error: ValidationError, flags: dict[str, str], env: bool = False) -> str:
    """One line naming, for each error, the flag (and with `env`, the SLAM_* variable) of its field.

    `flags` maps field names to flags. A check across fields has no field in its location: the first
    field its message mentions is named instead."""
    parts = []
    for e in error.errors():
        message = str(e["msg"]).removeprefix("Value error, ")
        field = next((str(x) for x in e["loc"] if isinstance(x, str)), "")
        if not field:
            mentioned = [(message.find(f), f) for f in flags if f in message]
            field = min(mentioned)[1] if mentioned else ""
        flag = flags.get(field, "")
        name = f"{flag} (SLAM_{field.upper()})" if flag and env else flag
        parts.append(f"{name}: {message}" if name else message)
    return "; ".join(parts)


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
