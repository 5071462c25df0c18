"""The `slam` command line as a user runs it: real processes, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SLAM = [sys.executable, "-m", "slam.cli"]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*SLAM, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--prompt", "hi", "--policy", "nope"], "--policy: unknown policy 'nope'"),
        (["generate", "--prompt", "hi", "--budget", "10"], "--budget: budget (10) must be at least sink + recent"),
        (["generate", "--prompt", "hi", "--budget", "ten"], "argument --budget: invalid int value: 'ten'"),
        (["generate", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens"),
        (["generate", "--prompt", "hi", "--model", "/no/such/model"], "--model: model path /no/such/model does not exist"),
        (["eval", "niah", "--policies", "full,bogus"], "--policies: unknown policy 'bogus'"),
        (["eval", "niah", "--budgets", "abc"], "argument --budgets"),
        (["eval", "niah", "--needle", "no key here"], "--needle: the template must contain {key}"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_generate_streams_text(smol_dir):
    result = run("generate", "--prompt", "What is the capital of France?", "--chat", "--policy", "slam",
                 "--max-tokens", "16", "--stats")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["generated_tokens"] <= 16


def test_cache_positions_generate_far_past_trained_length(tiny_dir):
    # The tiny model is trained for 64 positions; 10,000 tokens past that, the cache is still `budget` tokens.
    result = run("generate", "--model", str(tiny_dir), "--prompt", "Once upon a time", "--policy", "streaming",
                 "--position-mode", "cache", "--budget", "32", "--sink", "4", "--recent", "8",
                 "--max-tokens", "10064", "--ignore-eos", "--stats")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["generated_tokens"] == 10064
    assert stats["cache_tokens"] == 32


def test_eval_ppl_json_and_plot(tiny_dir, tmp_path):
    plot = tmp_path / "ppl.png"
    result = run("eval", "ppl", "--model", str(tiny_dir), "--policies", "full,streaming,slam", "--tokens", "96",
                 "--budget", "24", "--sink", "2", "--recent", "8", "--window", "32", "--json", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = {r["policy"]: r for r in map(json.loads, result.stdout.strip().splitlines())}
    assert set(rows) == {"full", "streaming", "slam"}
    assert rows["full"]["max_cache_tokens"] == 96
    assert rows["streaming"]["max_cache_tokens"] == rows["slam"]["max_cache_tokens"] == 24
    assert len(rows["full"]["curve"]) == 3 and all(r["ppl"] > 1 for r in rows.values())
    assert rows["streaming"]["ppl"] != rows["full"]["ppl"]  # eviction changes the predictions
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_eval_niah_json_table_and_plot(tiny_dir, tmp_path):
    plot = tmp_path / "niah.png"
    args = ["eval", "niah", "--model", str(tiny_dir), "--policies", "full,slam", "--budgets", "48,96", "--sink", "4",
            "--recent", "16", "--lengths", "200", "--depths", "0.5", "--seeds", "2"]
    result = run(*args, "--json", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(rows) == 2 * 3  # seeds x (full, slam/48, slam/96)
    assert {(r["policy"], r["budget"]) for r in rows} == {("full", None), ("slam", 48), ("slam", 96)}
    assert all({"policy", "budget", "length", "depth", "seed", "found", "answer"} <= r.keys() for r in rows)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = run(*args)
    assert table.returncode == 0 and "slam" in table.stdout and "/2" in table.stdout
