"""`slam bench decode`'s flags. The bench itself (torch, the engine) is imported only when it runs, so the
command line, and the operator's image without torch, start without it."""

from __future__ import annotations

from pathlib import Path

from slam.bench.shape_configs import SHAPES
from slam.flags import add_model_flags, add_selection_flags, positive_int, positive_list


def add_parser(sub) -> None:
    p = sub.add_parser("decode", help="decode throughput per policy, context and batch, beside a baseline")
    p.add_argument("--policies", type=positive_list(str), default=["full", "streaming", "slam"])
    p.add_argument("--contexts", type=positive_list(int), default=[512, 2000, 4000])
    p.add_argument("--batches", type=positive_list(int), default=[1])
    p.add_argument("--tokens", type=positive_int, default=32, help="decode steps timed per combination")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="passes over every combination, each row giving its fastest pass (noisy machines)")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="random weights from this model shape's config instead of --model (nothing downloaded)")
    p.add_argument("--baseline", choices=["none", "transformers"], default="none",
                   help="also time transformers' full-cache decode at each batch and context")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="GPUs: eager kernels for slam's selection (no torch.compile)")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                   help="launch each step before postprocessing the last (auto: with CUDA graphs)")
    add_selection_flags(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, default=None)
    add_model_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from slam.bench.decode import run as run_decode

    return run_decode(args)
