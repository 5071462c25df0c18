"""`slam bench decode` as users run it: random weights from a shape, a same-run transformers baseline, the
roofline, JSON rows and a plot; bad flags exit 2 naming the flag."""

from __future__ import annotations

import contextlib
import io
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
                "--contexts", "300", "--batches", "2", "--tokens", "3", "--repeat", "2", "--baseline", "transformers",
                "--async-scheduling", "on", "--json", "--plot", str(plot))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(r["engine"], r["policy"]) for r in rows] == [("transformers", "full"), ("slam", "streaming"),
                                                          ("slam", "slam")]
    base = rows[0]["decode_tokens_per_s"]
    for r in rows:
        assert r["context"] == 300 and r["batch"] == 2 and r["shape"] == "smollm2-135m" and r["repeat"] == 2
        assert r["decode_tokens_per_s"] > 0 and r["step_ms"] > 0
        # The roofline is a lower bound of the step: reading the weights alone takes that long.
        assert 0 < r["roofline_ms"] <= r["step_ms"] and 0 < r["roofline_pct"] <= 100
    for r in rows[1:]:
        assert r["baseline_ratio"] == pytest.approx(r["decode_tokens_per_s"] / base)
    # The oversampling the pool resolved (r = 1, 28 middle columns: budget 256's 1,504 candidate tokens, 54 x),
    # only on slam's row.
    assert [r["select_oversample"] for r in rows] == [None, None, 54]
    assert [r["async_scheduling"] for r in rows] == [None, True, True]  # asked for, on a CPU too
    # Churn: slam's picks change as random queries come (a share of its 28 middle columns), no other policy's.
    assert rows[0]["churn_pct"] is None and rows[1]["churn_pct"] is None and 0 < rows[2]["churn_pct"] <= 100
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_decode_repeat_keeps_each_rows_fastest_pass(tmp_path, monkeypatch):
    """--repeat R passes over every combination R times and keeps each row's fastest pass, its baseline ratio
    from the rows kept; rows say R."""
    from argparse import Namespace

    from slam.bench import decode

    timings = iter([30.0, 10.0, 20.0, 40.0, 5.0, 50.0])  # per pass: baseline, streaming, slam

    def fake(engine, policy):
        def measure(*args, **kwargs):
            ms = next(timings)
            return decode.DecodeResult(engine, policy, None, 100, 1, 1000 / ms, ms, 1.0, 1.0, None, "cpu")
        return measure

    monkeypatch.setattr(decode, "bench_transformers", fake("transformers", "full"))
    policies = iter(["streaming", "slam"] * 2)
    monkeypatch.setattr(decode, "bench_engine", lambda *a: fake("slam", next(policies))())
    monkeypatch.setattr(decode, "random_model", lambda *a: Namespace(device=torch.device("cpu"), model=None))
    monkeypatch.setattr(decode, "bandwidth", lambda device: 1.0)
    args = Namespace(shape="smollm2-135m", dtype="float32", device="cpu", policies=["streaming", "slam"], budget=96,
                     sink=4, recent=64, contexts=[100], batches=[1], tokens=2, repeat=2, baseline="transformers",
                     json=True, plot=None, select_every=1, select_oversample=None, select_chunk=8,
                     select_min_ratio=4, reserve_device="auto", enforce_eager=False, compile=True,
                     async_scheduling="auto")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert decode.run(args) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["step_ms"] for r in rows] == [30.0, 5.0, 20.0]  # each row's fastest of its two passes
    assert rows[1]["baseline_ratio"] == pytest.approx(6.0) and rows[2]["baseline_ratio"] == pytest.approx(1.5)
    assert all(r["repeat"] == 2 and r["tokens"] == 2 for r in rows)


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


@pytest.mark.parametrize(("dtype", "min_ratio"), [("int8", 8), ("float32", 1)])
def test_roofline_counts_the_bytes_of_the_buffers_read(dtype, min_ratio):
    """The roofline's bytes are those of the very tensors a step reads, at the precision they are stored in: the
    pool's keys and values; the reserve keys scored (int8 copies with bfloat16 scales under int8 weights, every one
    for exact selection) or stage one's int8 bounds with their scales (every other step here) and stage two's
    candidates; and the chosen values."""
    from slam.bench.shapes import SHAPES, kv_read_bytes, random_model, synthetic_request
    from slam.config import CacheConfig, EngineConfig
    from slam.engine.engine import LLMEngine
    from slam.engine.sequence import SamplingParams

    loaded = random_model(dict(SHAPES["smollm2-135m"], num_hidden_layers=2), dtype, "cpu")
    cache = CacheConfig(policy="slam", budget=128, sink=4, recent=32)
    engine = LLMEngine(EngineConfig(max_batch=2, cache=cache, dtype=dtype, max_model_len=1400, select_oversample=2,
                                    select_min_ratio=min_ratio, select_every=2), loaded)
    context, b, middle = 900, 2, 128 - 36
    for i in range(b):
        synthetic_request(engine, context, SamplingParams(max_tokens=4, ignore_eos=True), seed=i)
    pool = engine.runner.pool
    assert pool.two_stage == (min_ratio == 1)
    evicted = context - 36

    def held(tensors, n):  # bytes of reserve indices [0, n) of slots [0, b)
        return sum(t[:b, :, :n].nbytes for t in tensors)

    keys, scales = (pool.rq, pool.rq_scale) if dtype == "int8" else (pool.rk, [])
    want = sum(t[:b].nbytes for t in pool.k + pool.v) + held(pool.rv, middle)
    if pool.two_stage:
        chunks = -(-evicted // pool.chunk)
        want += held(pool.smin + pool.smax + pool.sscale, chunks) / 2 + held(keys + scales, pool.oversample * middle)
    else:
        want += held(keys + scales, evicted)
    assert keys[0].dtype == (torch.int8 if dtype == "int8" else torch.float32)
    assert kv_read_bytes(engine, cache, context, b) == int(want)
