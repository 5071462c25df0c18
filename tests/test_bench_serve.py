"""`slam bench serve` against a real server, and the OpenAPI schema fuzzed with schemathesis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from api_fixtures import server_env
from api_fixtures import fuzz_server_url, server_url  # noqa: F401  (fixtures)

from slam.bench.serve import percentile

pytestmark = pytest.mark.timeout(300)
TESTS = Path(__file__).parent


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slam.cli", "bench", "serve", "--no-progress", *args],
                          env=server_env(), capture_output=True, text=True, timeout=240)


def test_bench_serve_json(server_url):
    r = bench("--url", server_url, "--concurrency", "3", "--requests", "4", "--prompt-tokens", "12",
              "--max-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["requests"] == 4 and result["failed"] == 0
    assert result["output_tokens"] == 12  # ignore_eos: exactly max_tokens each
    assert result["output_tokens_per_s"] > 0 and result["requests_per_s"] > 0
    assert 0 < result["ttft_p50_ms"] <= result["ttft_p99_ms"]
    assert 0 < result["itl_p50_ms"] <= result["itl_p99_ms"]


def test_bench_serve_table(server_url):
    r = bench("--url", server_url, "--concurrency", "1", "--requests", "1", "--prompt-tokens", "8",
              "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "output tok/s" in r.stdout and "TTFT p50" in r.stdout


def test_bench_serve_unreachable():
    r = bench("--url", "http://127.0.0.1:9", "--requests", "1")
    assert r.returncode == 1
    assert "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_schema_fuzz_no_server_errors(fuzz_server_url, tmp_path):
    """schemathesis against the server's own OpenAPI schema: no response is a 5xx."""
    exe = Path(sys.executable).with_name("schemathesis")
    env = {**server_env(), "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([str(exe), "run", f"{fuzz_server_url}/openapi.json", "--checks", "not_a_server_error",
                        "--max-examples", "10", "--workers", "1", "--request-timeout", "60",
                        "--phases", "fuzzing", "--no-color"],
                       env=env, capture_output=True, text=True, timeout=280,
                       cwd=tmp_path)  # schemathesis writes a .schemathesis/ cache where it runs
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
