"""Command-line flags shared by the `slam` commands and the benches (which add their own subcommands).

It sits below both `slam.cli` and `slam.bench`, so neither has to import the other for a flag helper.
"""

from __future__ import annotations

import argparse


def positive_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")

    return parse


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
                   help="int8: dynamic int8 linear layers (CPU only)")
    p.add_argument("--prefill-chunk", type=int, default=512)
