"""`slam bench decode` as users run it: random weights from a shape, a same-run transformers baseline, the
roofline, JSON rows and a plot; bad flags exit 2 naming the flag."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def bench(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slam.cli", "bench", "decode", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_bench_decode_rows_baseline_and_plot(tmp_path):
    plot = tmp_path / "decode.png"
    run = bench("--shape", "smollm2-135m", "--dtype", "float32", "--policies", "streaming,slam", "--budget", "96",
                "--contexts", "300", "--batches", "2", "--tokens", "3", "--baseline", "transformers", "--json",
                "--plot", str(plot))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(r["engine"], r["policy"]) for r in rows] == [("transformers", "full"), ("slam", "streaming"),
                                                          ("slam", "slam")]
    base = rows[0]["decode_tokens_per_s"]
    for r in rows:
        assert r["context"] == 300 and r["batch"] == 2 and r["shape"] == "smollm2-135m"
        assert r["decode_tokens_per_s"] > 0 and r["step_ms"] > 0
        # The roofline is a lower bound of the step: reading the weights alone takes that long.
        assert 0 < r["roofline_ms"] <= r["step_ms"] and 0 < r["roofline_pct"] <= 100
    for r in rows[1:]:
        assert r["baseline_ratio"] == pytest.approx(r["decode_tokens_per_s"] / base)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_decode_repeat_times_each_cell_that_often(tmp_path):
    """--repeat R times each combination R times over its own steps and gives the fastest; the requests have
    room for all R x --tokens steps (bench_engine asserts they decoded them), and rows name R."""
    from slam.bench import decode

    steps = []
    best = decode.fastest(lambda: steps.append(1), 4, 3, torch.device("cpu"))
    assert len(steps) == 12 and best > 0
    run = bench("--shape", "smollm2-135m", "--dtype", "float32", "--policies", "slam", "--budget", "96",
                "--contexts", "200", "--batches", "1", "--tokens", "2", "--repeat", "3", "--json", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = [json.loads(line) for line in run.stdout.splitlines()]
    assert row["repeat"] == 3 and row["tokens"] == 2 and row["step_ms"] > 0


@pytest.mark.parametrize("args, flag", [(("--batches", "0"), "--batches"), (("--shape", "gpt-9"), "--shape"),
                                        (("--repeat", "0"), "--repeat"), (("--tokens", "x"), "--tokens")])
def test_bench_decode_bad_flags_exit_2(args, flag):
    run = bench(*args, timeout=120)
    assert run.returncode == 2
    assert flag in run.stderr


def test_warm_up_visits_every_refresh_phase_however_slow_the_steps():
    """Two-stage selection captures a decode graph per refresh phase, and at long contexts each capture takes
    longer than the warm-up's time budget: the warm-up still runs every phase (and two steps more), so no
    capture lands in the timed steps."""
    import time

    from slam.bench.decode import WARMUP_S, warm_up

    calls = []
    for phases in (1, 4):
        calls.clear()
        warm_up(lambda: (calls.append(1), time.sleep(WARMUP_S / 2)), torch.device("cpu"), phases)
        assert len(calls) == max(3, phases + 2)
