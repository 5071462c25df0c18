"""Command-line flags shared by the `slam` commands and the benches (which add their own subcommands).

It sits below both `slam.cli` and `slam.bench`, so neither has to import the other for a flag helper.
"""

from __future__ import annotations

import argparse


def positive_list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
        if not values or (kind is int and min(values) <= 0):
            raise argparse.ArgumentTypeError(f"expected one or more comma-separated values (integers above 0), got {text!r}")
        return values

    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0  # not an integer: refused below with the same message
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer above 0, got {text!r}")
    return value


def add_cache_flags(p: argparse.ArgumentParser, with_policy: bool = True) -> None:
    if with_policy:
        p.add_argument("--policy", default="slam", help="full, streaming, slam, snapkv, h2o")
    p.add_argument("--budget", type=int, default=256, help="tokens kept per layer and KV head")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--position-mode", choices=["original", "cache"], default="original",
                   help="'cache' numbers positions inside the cache and can run past the trained length")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                   help="int8: int8 weights, one scale per output channel (CPU only)")
    p.add_argument("--prefill-chunk", type=int, default=512)


def add_selection_flags(p: argparse.ArgumentParser) -> None:
    """slam's selection knobs, with the engine's defaults (EngineConfig); `selection(args)` reads them back."""
    from slam.config import EngineConfig

    d = EngineConfig()
    p.add_argument("--select-every", type=int, default=d.select_every,
                   help="slam: steps between a layer's refreshes of two-stage selection's chunks")
    p.add_argument("--select-chunk", type=int, default=d.select_chunk,
                   help="slam: reserve tokens per chunk bound (two-stage selection)")
    p.add_argument("--select-oversample", type=int, default=d.select_oversample,
                   help="slam: chunks rescored, in multiples of the critical columns (0: score the whole reserve; "
                        "default: 8, or 16 with --select-every 3 or more, for up to 188 critical columns; larger "
                        "budgets keep as many candidate tokens, at least twice their columns)")
    p.add_argument("--select-min-ratio", type=int, default=d.select_min_ratio,
                   help="slam: two stages once the reserve holds this many times the candidates "
                        "(default: %(default)s)")
    p.add_argument("--reserve-device", choices=["auto", "cuda", "cpu"], default=d.reserve_device)
    p.add_argument("--reserve-dtype", choices=["auto", "bfloat16", "int8"], default=d.reserve_dtype)


def selection(args: argparse.Namespace) -> dict:
    """The EngineConfig fields that add_selection_flags set."""
    return {name: getattr(args, name) for name in
            ("select_every", "select_chunk", "select_oversample", "select_min_ratio", "reserve_device",
             "reserve_dtype")}
