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
