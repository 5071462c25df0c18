"""Slam's selection and placement on CPUs as C++ ops (cpu_kernels.cpp, cpu_two_stage.cpp, cpu_rows.cpp,
cpu_top.cpp, cpu_scores.cpp, cpu_writes.cpp), the int8 weights' decode product (cpu_linear.cpp) and decode
attention over the pool (cpu_attention.cpp), built on first use.

A slam layer on a CPU ran about sixty small torch ops for its selection (the int8 scoring per KV head, the
masked log-softmax, the group's maximum, top-k with ties broken by reserve index, the gathers, churn and
column writes); each costs microseconds of dispatch. The ops compute what the torch code computes, in the same
arithmetic (int8 scores in exact integers), and give exactly what it gives (tests/test_cpu_kernels.py). The build
needs a C++ compiler: torch.utils.cpp_extension compiles once per machine, into its cache, in about 20 s.
Without a compiler (or with the engine's `compile` off) the torch versions run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SOURCES = [str(Path(__file__).with_name(name)) for name in (
    "cpu_kernels.cpp", "cpu_rows.cpp", "cpu_two_stage.cpp", "cpu_top.cpp", "cpu_scores.cpp", "cpu_writes.cpp",
    "cpu_linear.cpp", "cpu_attention.cpp")]
_lock = threading.Lock()
_state: dict[str, bool] = {}


def available() -> bool:
    """Whether the ops are loaded, building them on the first call (once per process)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
        return _state["ok"]


def _build() -> bool:
    # OpenMP spreads the ops' rows over the intra-op threads; a compiler without it (Apple's clang) still
    # builds them, each row then on one thread.
    for flags in (["-fopenmp"], []):
        try:
            from torch.utils import cpp_extension

            cpp_extension.load("slam_cpu_kernels", _SOURCES, extra_cflags=["-O3", *flags], extra_ldflags=flags,
                               is_python_module=False)
            return True
        except Exception as e:  # noqa: BLE001  (no compiler, no headers, a failed build: the torch code runs)
            error = e
    log.warning("slam's CPU kernels did not build (%s: %s); selection runs as torch ops", type(error).__name__, error)
    return False


def scoring_level(level: str = "") -> str:
    """The vector path of the integer scoring ("avx512", "avx2" or "default": scalar), capped at `level` when
    given. The best the CPU runs is the default; torch's ATEN_CPU_CAPABILITY caps it too. Every path gives the
    same scores (tests/test_cpu_kernels.py runs each)."""
    return torch.ops.slam_cpu.scoring_level(level)


def group_top(logp: torch.Tensor, stored: torch.Tensor, kc: int, order: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """selection.top_by_index over the group's maximum: logp [b, h, g, m] log-probabilities, stored [b, 1 or
    h, m], order [b, h, m] tie keys below 2^32 (None: positions) -> (the picks' tie keys, or their positions in m,
    and scores) [b, h, kc], best first."""
    empty = torch.empty(0, dtype=torch.long)
    return torch.ops.slam_cpu.group_top(logp, stored, kc, empty if order is None else order)


def exact_top_int8(q: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor, rpos: torch.Tensor, n: torch.Tensor,
                   kc: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """selection.exact_top(dot_int8(q, keys, scales), rpos, n, kc, scale, ties=True) in one call: q [b, h, g, d],
    keys [b, h, m, d] int8 with bfloat16 scales [b, h, m], rpos [b, m], n [b] -> (positions, scores) [b, h, kc]."""
    return torch.ops.slam_cpu.exact_top_int8(q, keys, scales, rpos, n, kc, scale)


def chunk_top_int8(q: torch.Tensor, smin: torch.Tensor, smax: torch.Tensor, sscale: torch.Tensor, n: torch.Tensor,
                   first: int, chunk: int, scale: float) -> torch.Tensor:
    """selection.chunk_top_int8 in one call -> chunk indices [b, h, first], best first."""
    return torch.ops.slam_cpu.chunk_top_int8(q, smin, smax, sscale, n, first, chunk, scale)


def candidate_top_int8(q: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor, chunks: torch.Tensor,
                       rpos: torch.Tensor, n: torch.Tensor, chunk: int, kc: int, scale: float,
                       fresh: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """selection.candidate_top(dot_int8 of the tokens of `chunks` [b, h, nc], ..., ties=True) in one call, each
    chunk's rows scored where they lie in the reserve: keys [slots, h, rows, d] int8 and scales [slots, h, rows]
    the whole reserve, rpos [slots, rows], fresh [b, h, nc] (False: a repeated chunk, left out) -> (reserve
    indices, scores) [b, h, kc]."""
    empty = torch.empty(0, dtype=torch.bool)
    return torch.ops.slam_cpu.candidate_top_int8(q, keys, scales, chunks, rpos, n, empty if fresh is None else fresh,
                                                 chunk, kc, scale)


def two_stage_top_int8(q: torch.Tensor, pool, layer: int, n: torch.Tensor, chunks: int, first: int, kc: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A refreshing layer's two stages in one call: chunk_top_int8 over the pool's bounds of chunks [0, chunks),
    its picks stored in pool.cand[layer][:b, :, :first], then candidate_top_int8 over their tokens -> (reserve
    indices, scores) [b, kv_heads, kc]."""
    return torch.ops.slam_cpu.two_stage_top_int8(q, pool.smin[layer], pool.smax[layer], pool.sscale[layer],
                                                 *pool.int8_keys(layer), pool.rpos, n, pool.cand[layer], chunks,
                                                 first, pool.chunk, kc, scale)


def place(pool, layer: int, idx: torch.Tensor, score: torch.Tensor, col: torch.Tensor) -> None:
    """slam.place's gathers, churn and column writes for layer `layer` of slots [0, idx.shape[0])."""
    pool.replaced[: idx.shape[0]] += torch.ops.slam_cpu.place(
        idx, score, pool.rpos, pool.rk[layer], pool.rv[layer], pool.k[layer], pool.v[layer], pool.pos[layer],
        pool.ridx[layer], col, pool.budget)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 times int8 weight [N, K] with float32 scales [N] -> [M, N] float32; each row's bits do not
    depend on M or on the vector path (cpu_linear.cpp)."""
    return torch.ops.slam_cpu.int8_linear(x, weight, scale)


def decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """engine/attention.attend for one query per slot: q [b, H*G, 1, D], k and v [b, H, C, D] float32 or bfloat16,
    valid [b, H, 1, C] -> [b, H*G, 1, D] float32; each row's bits do not depend on b or on the vector path
    (cpu_attention.cpp)."""
    return torch.ops.slam_cpu.decode_attend(q, k, v, valid, scale)
