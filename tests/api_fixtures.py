"""Fixtures for the HTTP tests: real `slam serve` processes on free loopback ports, and a reference engine.

The servers run as subprocesses through `python -m slam.cli serve`, so the tests exercise the same
code path as `slam serve`, over real HTTP.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slam.config import CacheConfig, EngineConfig, ServerSettings
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams

MODEL = "SmolLM2-135M-Instruct"
# Small everything: short prompts, a small budget so eviction happens, few tokens per request.
BUDGET, SINK, RECENT = 24, 4, 8
MAX_PROMPT_TOKENS = 200
RESUME_GRACE_S = 2.0
MAX_N = 4
SERVER_ARGS = ["--budget", str(BUDGET), "--sink", str(SINK), "--recent", str(RECENT), "--max-batch", "16",
               "--max-queue", "16", "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--resume-grace-s",
               str(RESUME_GRACE_S), "--max-n", str(MAX_N)]
READY_TIMEOUT_S = 120


# The weights `slam serve` runs at its defaults: reference engines use the same.
SERVER_DTYPE = ServerSettings.model_fields["dtype"].default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("SLAM_HOME", str(Path.home() / ".cache" / "slam"))
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "slam.cli", "serve", *args]


@contextlib.contextmanager
def running_server(*args: str, log: Path) -> Iterator[str]:
    """Start `slam serve` with `args` on a free port; yield its base URL once /ready answers 200."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_command("--port", str(port), *args), env=server_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"slam serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"slam serve not ready after {READY_TIMEOUT_S}s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Test modules import these fixtures, which makes each module's copy a separate fixture; the cache makes
# them share one server per configuration for the whole session. The copy that started it stops it.
_started: dict[str, str] = {}


def _shared_server(name: str, args: list[str], tmp_path_factory) -> Iterator[str]:
    if name in _started:
        yield _started[name]
        return
    with running_server(*args, log=tmp_path_factory.mktemp(name) / "serve.log") as url:
        _started[name] = url
        try:
            yield url
        finally:
            del _started[name]


@pytest.fixture(scope="session")
def server_url(tmp_path_factory) -> Iterator[str]:
    yield from _shared_server("serve", SERVER_ARGS, tmp_path_factory)


@pytest.fixture(scope="session")
def fuzz_server_url(tmp_path_factory) -> Iterator[str]:
    """The shared settings plus --max-model-len 96: the server's own limit, not the fuzzer, bounds how long
    a fuzzed request may generate (at the trained length one request could decode 8K tokens)."""
    yield from _shared_server("serve-fuzz", [*SERVER_ARGS, "--max-model-len", "96"], tmp_path_factory)


@pytest.fixture(scope="session")
def api_key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text("\nfirst-key\n  second-key  \n")
    return path


@pytest.fixture(scope="session")
def small_server_url(tmp_path_factory, api_key_file) -> Iterator[str]:
    """One batch slot, no queue, API keys required: for 429 and 401."""
    args = [*SERVER_ARGS[:6], "--max-batch", "1", "--max-queue", "0", "--api-key-file", str(api_key_file),
            "--resume-grace-s", "1"]
    yield from _shared_server("serve-small", args, tmp_path_factory)


@pytest.fixture(scope="session")
def ref_engine(smol) -> LLMEngine:
    """The engine in-process with the server's default settings: the source of expected outputs."""
    cache = CacheConfig(policy="slam", budget=BUDGET, sink=SINK, recent=RECENT)
    return LLMEngine(EngineConfig(max_batch=1, cache=cache, dtype=SERVER_DTYPE), loaded=smol)


def expected(engine: LLMEngine, prompt_ids: list[int], max_tokens: int, cache: CacheConfig | None = None,
             **sampling) -> tuple[str, list[int], str]:
    """Text, token ids and finish reason of one request run alone, greedy unless told otherwise."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)
    (seq,) = engine.generate([prompt_ids], params, cache)
    return seq.output_text, list(seq.output_ids), seq.finish_reason or ""


def metric(url: str, name: str) -> float:
    """One sample of the server's /metrics by exact series name (labels included)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)
