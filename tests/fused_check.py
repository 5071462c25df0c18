"""The Triton kernels of the decode step against the eager code they replace: the writing kernels
(tests/fused_writes.py: placement, append, ring write) and the selection and attention kernels
(tests/fused_select.py). Runs on a CUDA device, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1 PYTHONPATH=server:. python tests/fused_check.py`); e2e/gpu_checks.py and
tests/test_fused_place.py call check_all.
"""

from __future__ import annotations

import sys

import torch

from slam.cache import fused_top
from slam.engine import ring
from tests.fused_select import (compare_attention, compare_chunk_top, compare_dots, compare_int8_selection,
                                compare_latest, compare_limit, compare_ties, compare_top, compare_two_stage)
from tests.fused_writes import compare, compare_append, compare_ring


def check_all(device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
    compare(device, dtype, seed)
    compare(device, dtype, seed, kc=150)  # several copy programs per slot and head
    compare(device, dtype, seed, kc=300)
    compare(device, dtype, seed, reserve_int8=True)
    compare(device, dtype, seed, kc=300, reserve_int8=True)
    compare_append(device, dtype, seed)
    compare_append(device, dtype, seed, reserve_int8=True, d=64)
    compare_ring(device, dtype, seed, ring.kernel_ring_write)
    compare_top(device, dtype, seed)
    compare_top(device, dtype, seed, kc=188, m=3936, group=4)
    compare_top(device, dtype, seed, kc=300, m=3000)  # many picks
    compare_top(device, dtype, seed, kc=188, m=9000)  # a long row: the block kernels
    compare_limit(device, dtype, seed)  # a long row: the block kernels
    compare_limit(device, dtype, seed, m=3000)  # one program per row
    compare_limit(device, dtype, seed, kc=1980, m=3960)  # budget 2048's middle among its candidates
    compare_ties(device, seed)  # large groups of equal scores: the bisection's early stop
    compare_latest(device, seed)
    compare_dots(device, dtype, seed)
    compare_dots(device, dtype, seed, int8=True)
    compare_chunk_top(device, dtype, seed)
    compare_int8_selection(device, seed)
    compare_two_stage(device, dtype, seed)
    compare_two_stage(device, dtype, seed, kc=300)
    saved, fused_top.SPAN_LIMIT = fused_top.SPAN_LIMIT, 0
    try:  # stage two's candidates through the long-row kernels, which also turn columns into reserve indices
        compare_two_stage(device, dtype, seed)
    finally:
        fused_top.SPAN_LIMIT = saved
    compare_attention(device, dtype, seed)
    compare_attention(device, dtype, seed, cols=2049, group=4)


if __name__ == "__main__":
    check_all(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print("fused placement, ring write, group top-k, in-place stage two and decode attention equal their eager "
          "versions")
