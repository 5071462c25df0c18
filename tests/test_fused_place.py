"""The decode step's Triton kernels (placement, append, ring write, top-k, stage two, attention) equal their eager
code (tests/fused_check.py).

On a GPU it runs there; on a CPU with Triton installed, under Triton's interpreter in a subprocess (the
interpreter is chosen when the kernel is defined); without Triton it is skipped, and e2e/gpu_checks.py
runs it on the GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).with_name("fused_check.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed: e2e/gpu_checks.py checks the fused placement on a GPU")
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_placement_equals_eager(seed):
    if torch.cuda.is_available():
        from tests.fused_check import check_all

        check_all("cuda", torch.bfloat16, seed)
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = (f"import sys; sys.path.insert(0, {str(CHECK.parent.parent)!r}); from tests.fused_check import check_all; "
            f"check_all('cpu', seed={seed})")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
