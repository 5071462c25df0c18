"""Issue 9 through HTTP: supervised loop, disconnects, server limits, the OpenAI surface, drain.

In-process apps (FastAPI's TestClient, the real engine) where a failure has to be injected into the engine;
real `slam serve` processes otherwise. Expected outputs come from the engine run alone.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from api_fixtures import BUDGET, MODEL, RESUME_GRACE_S, expected, metric
from api_fixtures import ref_engine, server_url  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient

from slam.api.server import create_app
from slam.config import ServerSettings
from slam.engine.engine import LLMEngine

pytestmark = pytest.mark.timeout(300)
PROMPT = "The capital of France is"


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.fixture
def app_with(smol):
    """An in-process server over the real model, with settings of the test's choice."""
    def make(**overrides):
        settings = ServerSettings(**{"budget": BUDGET, "sink": 4, "recent": 8, **overrides})
        engine = LLMEngine(settings.engine_config(), loaded=smol)
        return create_app(settings, engine), engine

    return make


# --- 1. a supervised engine loop ---------------------------------------------------------------------------
def test_a_failing_request_fails_alone_over_http(app_with, monkeypatch):
    app, engine = app_with()
    real = engine.runner_step

    def nan_for_seed_666(batch):
        rows, logits = real(batch)
        if logits is not None:
            logits = logits.clone()
            for i, seq in enumerate(rows):
                if seq.sampling.seed == 666:
                    logits[i] = float("nan")
        return rows, logits

    monkeypatch.setattr(engine, "runner_step", nan_for_seed_666)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "ignore_eos": True}
    results = {}
    with TestClient(app) as client:
        def post(name, extra):
            results[name] = client.post("/v1/completions", json={**body, **extra})

        threads = [threading.Thread(target=post, args=("bad", {"seed": 666, "temperature": 1.0})),
                   threading.Thread(target=post, args=("good", {"temperature": 0}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert "NaN" in error_of(results["bad"], 500)["message"]
        assert results["good"].status_code == 200
        assert results["good"].json()["usage"]["completion_tokens"] == 8
        assert client.get("/health").status_code == 200


def test_a_failure_after_the_step_fails_its_request(app_with, monkeypatch):
    app, _ = app_with()
    with TestClient(app) as client:
        loop = app.state.loop
        monkeypatch.setattr(loop.buffers, "append", lambda *a, **k: (_ for _ in ()).throw(KeyError("buffer")))
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3})
        assert "KeyError" in error_of(r, 500)["message"]
        monkeypatch.undo()
        assert client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3}).status_code == 200
        assert metric_of(client, "slam:num_requests_running") == 0


def test_a_loop_that_cannot_go_on_turns_health_503(app_with, monkeypatch):
    app, engine = app_with()
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("scheduler broke")))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3})
        assert "scheduler broke" in error_of(r, 500)["message"]  # an error, not a request that hangs
        deadline = time.monotonic() + 10
        while client.get("/health").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert error_of(client.get("/health"), 503)["code"] == "engine_dead"
        assert client.get("/ready").status_code == 503
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3})
        assert r.status_code == 503


def metric_of(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


# --- 2. disconnects free work --------------------------------------------------------------------------------
def test_gone_non_streaming_client_is_aborted_within_a_second(server_url):
    before = metric(server_url, "slam:num_requests_running")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server_url}/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=1.5))
    gone = time.monotonic()
    while metric(server_url, "slam:num_requests_running") != before:
        assert time.monotonic() - gone < 1.0, "the request still runs 1 s after its client left"
        time.sleep(0.05)


def test_dropped_stream_resumes_within_grace(server_url, ref_engine):
    want, ids, _ = expected(ref_engine, ref_engine.encode(PROMPT), 40, ignore_eos=True)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}
    seen, last_id, request_id = "", None, None
    with httpx.stream("POST", f"{server_url}/v1/completions", json=body, timeout=60) as r:
        request_id = r.headers["X-Request-Id"]
        for line in r.iter_lines():
            if line.startswith("id: "):
                last_id = line[4:]
            elif line.startswith("data: "):
                seen += json.loads(line[6:])["choices"][0]["text"]
                if last_id == "4":
                    break
    time.sleep(RESUME_GRACE_S / 2)  # gone for a while, but within the grace
    rest, finish = "", None
    with httpx.stream("GET", f"{server_url}/v1/requests/{request_id}/stream", headers={"Last-Event-ID": last_id},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                rest += chunk["text"]
                finish = chunk["finish_reason"] or finish
    assert seen + rest == want and finish == "length"
    summary = httpx.get(f"{server_url}/v1/requests/{request_id}").json()
    assert summary["status"] == "finished" and summary["output_ids"] == ids


# --- 3. limits from the server ------------------------------------------------------------------------------
def test_max_model_len_default_is_the_trained_length(server_url, ref_engine):
    trained = ref_engine.loaded.model.config.max_position_embeddings
    prompt_len = len(ref_engine.encode(PROMPT))
    r = httpx.post(f"{server_url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": trained})
    err = error_of(r, 400)
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    assert f"prompt ({prompt_len} tokens) + max_tokens ({trained}) = {prompt_len + trained}" in err["message"]
    assert f"maximum of {trained} tokens" in err["message"]


def test_limits_of_the_slam_field(app_with):
    app, _ = app_with(max_model_len=64, allowed_policies="slam,streaming", max_budget=32)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    with TestClient(app) as client:
        err = error_of(client.post("/v1/completions", json={**body, "slam": {"policy": "full"}}), 400)
        assert err["param"] == "slam.policy" and "slam, streaming" in err["message"]
        err = error_of(client.post("/v1/completions", json={**body, "slam": {"budget": 33}}), 400)
        assert err["param"] == "slam.budget" and "32 (--max-budget)" in err["message"]
        ok = client.post("/v1/completions", json={**body, "slam": {"policy": "streaming", "budget": 32}})
        assert ok.status_code == 200
        err = error_of(client.post("/v1/completions", json={**body, "max_tokens": 64}), 400)
        assert "maximum of 64 tokens (--max-model-len)" in err["message"]
        # Without max_tokens, a request gets what is left of the limit, not an error.
        chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                         "ignore_eos": True})
        assert chat.status_code == 200
        assert chat.json()["usage"]["total_tokens"] == 64


def test_positions_in_the_cache_lift_the_trained_length(app_with):
    from slam.api.schemas import CompletionRequest

    app, engine = app_with(position_mode="cache", policy="streaming")
    preparer = app.state.preparer
    far = engine.loaded.model.config.max_position_embeddings * 2
    assert preparer.completion(CompletionRequest(model=MODEL, prompt=PROMPT, max_tokens=far)).sampling.max_tokens == far
    with pytest.raises(Exception, match="max-model-len"):  # `full` keeps every position: the trained length holds
        preparer.completion(CompletionRequest(model=MODEL, prompt=PROMPT, max_tokens=far, slam={"policy": "full"}))


# --- 6. graceful shutdown without S3 ---------------------------------------------------------------------------
def test_sigterm_without_s3_lets_running_requests_finish(tmp_path):
    import signal
    import subprocess

    from api_fixtures import free_port, serve_command, server_env

    drain_s = 6.0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(serve_command("--port", str(port), "--budget", "24", "--sink", "4", "--recent", "8",
                                          "--drain-timeout-s", str(drain_s)), env=server_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        results: dict[str, tuple[str, str | None]] = {}

        def stream(name: str, max_tokens: int) -> None:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                    "temperature": 0}
            text, reason = "", None
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            choice = json.loads(line[6:])["choices"][0]
                            text, reason = text + choice["text"], choice["finish_reason"] or reason
                        started.set()
            except httpx.HTTPError:
                pass
            results[name] = (text, reason)

        started = threading.Event()
        short = threading.Thread(target=stream, args=("short", 24))
        long = threading.Thread(target=stream, args=("long", 4000))
        long.start()
        short.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        time.sleep(0.3)
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
        assert error_of(r, 503)["code"] == "shutting_down"
        short.join(60)
        assert results["short"][1] == "length"  # ran to the end during the drain
        assert proc.wait(drain_s + 20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        long.join(30)
        assert results["long"][1] is None  # cut when the drain timeout was over
        assert time.monotonic() - t0 >= drain_s - 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
