"""torch.compile for small hot-path functions on GPUs, nano-vllm style: inductor fuses each function's
element-wise work into one or two kernels, and the compiled kernels are captured in the decode step's CUDA
graph like any other. Compiled on first use, with symbolic shapes (one compilation serves every batch
bucket): importing the compiler costs seconds that a CPU server need not pay. The engine's `compile`
setting turns it off (eager kernels)."""

from __future__ import annotations

from collections.abc import Callable

import torch

_compiled: dict[Callable, Callable] = {}


def compiled(fn: Callable, enabled: bool = True) -> Callable:
    """`fn` through torch.compile when enabled, else `fn` itself."""
    if not enabled:
        return fn
    if fn not in _compiled:
        import torch._inductor.config as inductor

        # No autotuning by timing: kernels picked by a benchmark can differ between runs, and round differently.
        if hasattr(inductor, "deterministic"):
            inductor.deterministic = True
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]
