"""Every error the server gives, checked for status and OpenAI-shaped body; and `slam serve`'s bad flags."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import openai
import pytest
from api_fixtures import MAX_N, MAX_PROMPT_TOKENS, MODEL, serve_command, server_env
from api_fixtures import api_key_file, server_url, small_server_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)


def assert_error(r: httpx.Response, status: int, *, param: str | None = "any", code: str | None = "any",
                 contains: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "any":
        assert err["param"] == param
    if code != "any":
        assert err["code"] == code
    assert contains in err["message"]
    return err


def post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(url + path, timeout=60, **kwargs)


def test_malformed_json(server_url):
    r = post(server_url, "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_error(r, 400, contains="not valid JSON")


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": 3}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_k": 175555934206208637927424}, "top_k"),  # found by the schema fuzz
    ({"model": MODEL, "prompt": 5}, "prompt.str"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "messages": []}, "messages"),
])
def test_wrong_types_are_400(server_url, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = assert_error(post(server_url, path, json=body), 400)
    assert err["param"].startswith(param.split(".")[0])


def test_chat_message_role_checked(server_url):
    body = {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}
    assert_error(post(server_url, "/v1/chat/completions", json=body), 400, param="messages.0.role")


def test_n_up_to_the_server_limit(server_url):
    r = post(server_url, "/v1/completions", json={"model": MODEL, "prompt": "hi", "n": MAX_N + 1})
    assert_error(r, 400, param="n", contains=f"maximum is {MAX_N} (--max-n)")


def test_prompt_too_long_names_limit(server_url):
    r = post(server_url, "/v1/completions", json={"model": MODEL, "prompt": list(range(10, 10 + MAX_PROMPT_TOKENS + 1))})
    assert_error(r, 400, param="prompt", code="context_length_exceeded", contains=str(MAX_PROMPT_TOKENS))
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 400}])
    assert str(MAX_PROMPT_TOKENS) in info.value.body["message"]


def test_empty_prompt_and_bad_token_ids(server_url):
    assert_error(post(server_url, "/v1/completions", json={"model": MODEL, "prompt": ""}), 400, param="prompt")
    r = post(server_url, "/v1/completions", json={"model": MODEL, "prompt": [1, 10**9]})
    assert_error(r, 400, param="prompt", contains="vocabulary")


def test_bad_cache_settings(server_url):
    r = post(server_url, "/v1/completions", json={"model": MODEL, "prompt": "hi", "slam": {"budget": 5, "recent": 64}})
    assert_error(r, 400, param="slam", contains="sink + recent")
    r = post(server_url, "/v1/completions", json={"model": MODEL, "prompt": "hi", "slam": {"policy": "magic"}})
    assert_error(r, 400, param="slam.policy", contains="not allowed on this server")
    r = post(server_url, "/v1/completions", json={"model": MODEL, "prompt": "hi", "slam": {"colour": 1}})
    assert_error(r, 400)


def test_unknown_model_404(server_url):
    r = post(server_url, "/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert_error(r, 404, param="model", code="model_not_found", contains="gpt-9")
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_unknown_route_and_method(server_url):
    assert_error(httpx.get(f"{server_url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{server_url}/v1/completions"), 405)


def test_tokenize_needs_exactly_one_input(server_url):
    assert_error(post(server_url, "/tokenize", json={}), 400, param="prompt")
    r = post(server_url, "/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert_error(r, 400)


def test_api_key(small_server_url):
    url = small_server_url
    assert_error(httpx.get(f"{url}/v1/models"), 401, code="invalid_api_key")
    assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer second-key"})
    assert ok.status_code == 200
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(url + path).status_code == 200, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="first-key", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices[0].finish_reason


def test_queue_full_429(small_server_url):
    """max-batch 1, max-queue 0: while one request runs, the next is refused with Retry-After."""
    url, headers = small_server_url, {"Authorization": "Bearer first-key"}
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    started, done = threading.Event(), threading.Event()

    def hold() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    if done.wait(0):
                        return

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert started.wait(60)
        r = post(url, "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, headers=headers)
        assert_error(r, 429, code="queue_full")
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        done.set()
        holder.join(30)
    # Once the holder is gone and its resume grace (1 s) is over, the slot frees and requests are served again.
    deadline = time.monotonic() + 10
    while (r := post(url, "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                     headers=headers)).status_code == 429:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert r.status_code == 200


BAD_SERVE_CASES = [
    (["--port", "http"], {}, "--port"),
    (["--budget", "8", "--recent", "64"], {}, "sink + recent"),
    ([], {"SLAM_MAX_BATCH": "0"}, "--max-batch"),
    (["--model", "/no/such/model"], {}, "--model"),
]


def test_serve_bad_flags_exit_2():
    """One clear line on stderr naming the flag, exit code 2, no traceback (run side by side: each
    process spends its time importing torch)."""
    procs = [subprocess.Popen(serve_command(*args), env={**server_env(), **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, env, _ in BAD_SERVE_CASES]
    for proc, (args, env, needle) in zip(procs, BAD_SERVE_CASES):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, env, stderr)
        lines = [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]
        assert len(lines) == 1, stderr
        assert needle in lines[0] and "Traceback" not in stderr, stderr


def test_flags_override_env(monkeypatch):
    import argparse

    from slam.cli.serve import register, settings_from

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("SLAM_PORT", "9000")
    monkeypatch.setenv("SLAM_BUDGET", "100")
    settings = settings_from(parser.parse_args(["serve", "--port", "9001"]))
    assert (settings.port, settings.budget) == (9001, 100)


def test_not_ready_503_and_engine_failure_500(smol):
    """In-process: /ready is 503 until the engine loop runs; a failing step fails its request with a 500
    in OpenAI shape, and the server keeps serving."""
    from fastapi.testclient import TestClient

    from slam.api.server import create_app
    from slam.config import ServerSettings
    from slam.engine.engine import LLMEngine

    settings = ServerSettings(budget=24, sink=4, recent=8)
    engine = LLMEngine(settings.engine_config(), loaded=smol)
    app = create_app(settings, engine)
    assert_error(TestClient(app).get("/ready"), 503, code="not_ready")  # no lifespan: loop not started

    real_run = engine.runner_step
    engine.runner_step = lambda batch: (_ for _ in ()).throw(RuntimeError("boom"))
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 200
        assert_error(client.post("/v1/completions", json=body), 500, code="engine_error", contains="boom")
        engine.runner_step = real_run
        assert client.post("/v1/completions", json=body).status_code == 200
