"""The HTTP API through the official `openai` client against a real `slam serve` process.

Expected outputs come from the same engine in-process (greedy), so these tests check that the server adds
nothing and loses nothing between the engine and the client.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from api_fixtures import BUDGET, MODEL, RESUME_GRACE_S, expected, metric
from api_fixtures import ref_engine, server_url  # noqa: F401  (fixtures)

from slam.config import CacheConfig

pytestmark = pytest.mark.timeout(300)
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def sse_events(url: str, path: str, body: dict) -> list[tuple[str | None, str]]:
    """(id, data) of each SSE event, read raw so the `id:` lines are visible."""
    events, current_id = [], None
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("id: "):
                current_id = line[4:]
            elif line.startswith("data: "):
                events.append((current_id, line[6:]))
                current_id = None
    return events


def test_completion_matches_engine(client, ref_engine):
    text, ids, reason = expected(ref_engine, ref_engine.encode(PROMPT), 6)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(ref_engine.encode(PROMPT))
    assert r.usage.completion_tokens == len(ids)
    extra = r.usage.model_extra
    assert 0 < extra["cache_tokens"] <= BUDGET and extra["cache_bytes"] > 0


def test_completion_stream_matches_engine(client, ref_engine):
    text, ids, reason = expected(ref_engine, ref_engine.encode(PROMPT), 6)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason
    assert len(chunks) == len(ids)  # one event per generated token


def test_completion_token_ids_prompt(client, ref_engine):
    prompt = ref_engine.encode("Once upon a time")
    text, _, _ = expected(ref_engine, prompt, 5)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert r.choices[0].text == text


def test_chat_matches_engine(client, ref_engine):
    text, _, reason = expected(ref_engine, ref_engine.encode_chat(CHAT), 6)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason


def test_chat_stream_with_usage(client, ref_engine):
    prompt = ref_engine.encode_chat(CHAT)
    text, ids, _ = expected(ref_engine, prompt, 6)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=6,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(ids))
    assert 0 < usage.model_extra["cache_tokens"] <= BUDGET


def test_sse_ids_are_token_indices(server_url):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    events = sse_events(server_url, "/v1/completions", body)
    assert events[-1] == (None, "[DONE]")
    token_events = [(i, json.loads(d)) for i, d in events[:-1] if json.loads(d)["choices"]]
    assert [i for i, _ in token_events] == ["0", "1", "2", "3", "4"]
    assert json.loads(events[-2][1])["usage"]["completion_tokens"] == 5


def test_stop_string(client, ref_engine):
    full, _, _ = expected(ref_engine, ref_engine.encode(PROMPT), 6)
    stop = full.strip()[:3]
    text, _, reason = expected(ref_engine, ref_engine.encode(PROMPT), 6, stop=[stop])
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "stop") == (text, reason)
    assert stop not in r.choices[0].text


def test_per_request_cache_settings(client, ref_engine):
    prompt = ref_engine.encode("one two three four five six seven eight nine ten eleven twelve thirteen")
    full_cache = CacheConfig(policy="full", budget=None)
    text, ids, _ = expected(ref_engine, prompt, 5, full_cache)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                  extra_body={"slam": {"policy": "full"}})
    assert r.choices[0].text == text
    # The full cache holds every token that went through the model: the prompt and all but the last output.
    assert r.usage.model_extra["cache_tokens"] == len(prompt) + len(ids) - 1
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                  extra_body={"slam": {"policy": "streaming", "budget": 12, "sink": 2, "recent": 8}})
    assert r.usage.model_extra["cache_tokens"] <= 12


def test_seeded_sampling_repeats(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=1234)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def test_concurrent_streams_match_alone(server_url, ref_engine):
    """16 greedy streams batched together give the tokens each one gets alone."""
    prompts = [f"Request {i}: the number after {i} is" for i in range(16)]
    want = [expected(ref_engine, ref_engine.encode(p), 5)[0] for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                                  stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(all_of_them())
    assert got == want


def test_disconnect_aborts_and_frees(server_url):
    """A dropped stream runs on for the resume grace (nobody resumes it here), then is aborted."""
    before = metric(server_url, "slam:num_requests_running")
    aborted = metric(server_url, "slam:request_aborted_total")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 500, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server_url}/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 2:
                break
        assert metric(server_url, "slam:num_requests_running") == before + 1
    gone = time.monotonic()
    while metric(server_url, "slam:num_requests_running") != before:
        assert time.monotonic() - gone < RESUME_GRACE_S + 1.0, "the dropped request still runs after its grace"
        time.sleep(0.05)
    assert time.monotonic() - gone > RESUME_GRACE_S - 0.5, "aborted before the resume grace was over"
    assert metric(server_url, "slam:request_aborted_total") == aborted + 1


def test_models_health_ready_tokenize(server_url, client, ref_engine):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server_url}/health").json() == {"status": "alive"}
    assert httpx.get(f"{server_url}/ready").status_code == 200
    r = httpx.post(f"{server_url}/tokenize", json={"prompt": PROMPT}).json()
    assert r == {"tokens": ref_engine.encode(PROMPT), "count": len(ref_engine.encode(PROMPT))}
    r = httpx.post(f"{server_url}/tokenize", json={"messages": CHAT}).json()
    assert r["tokens"] == ref_engine.encode_chat(CHAT) and r["count"] == len(r["tokens"])


def test_metrics_exposed(server_url, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    text = httpx.get(f"{server_url}/metrics").text
    for name in ["slam:num_requests_running", "slam:num_requests_waiting", "slam:time_to_first_token_seconds_bucket",
                 "slam:inter_token_latency_seconds_bucket", "slam:prompt_tokens_total",
                 "slam:generation_tokens_total", "slam:kv_cache_bytes", "slam:kv_cache_budget_usage_ratio",
                 "slam:cache_replacements_total", "slam:engine_steps_ahead_total",
                 'slam:request_success_total{finished_reason="length"}']:
        assert name in text, name
    assert metric(server_url, "slam:generation_tokens_total") >= 2
    assert "slam:gpu_" not in text  # no GPU here: the series are absent, not zero
