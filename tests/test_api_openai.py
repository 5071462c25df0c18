"""Issue 9 item 4 through HTTP: logprobs, n, echo, penalties, min_tokens, stop_token_ids, unsupported fields,
stop strings that never stream cut text, and lone surrogates on every route."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from api_fixtures import MODEL, expected
from api_fixtures import ref_engine, server_url  # noqa: F401  (fixtures)

from slam.engine.sequence import SamplingParams

pytestmark = pytest.mark.timeout(300)
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def sse(url: str, path: str, body: dict) -> tuple[str, list[dict]]:
    chunks = []
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        rid = r.headers["X-Request-Id"]
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    return rid, chunks


def test_completion_logprobs(client, ref_engine):
    ids = ref_engine.encode(PROMPT)
    outs = []
    (seq,) = ref_engine.generate([ids], SamplingParams(max_tokens=4, logprobs=2), on_output=outs.append)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([o.logprob for o in outs], abs=1e-3)
    assert lp.tokens == [ref_engine.tokenizer.decode([t]) for t in seq.output_ids]
    assert [len(d) for d in lp.top_logprobs] == [2] * 4
    assert all(max(d.values()) == pytest.approx(v, abs=1e-3) for d, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


def test_chat_logprobs_streamed_and_not(client, server_url):
    body = dict(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**body)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    _, chunks = sse(server_url, "/v1/chat/completions", {**body, "stream": True})
    streamed = [e for c in chunks for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["logprob"] for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    err = httpx.post(f"{server_url}/v1/chat/completions", json={**body, "logprobs": False}).json()["error"]
    assert err["param"] == "top_logprobs"


def test_n_choices_are_seeded_requests(client, server_url):
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5)
    r = client.completions.create(n=3, **body)
    assert [c.index for c in r.choices] == [0, 1, 2]
    alone = [client.completions.create(**{**body, "seed": 5 + i}) for i in range(3)]
    singles = [a.choices[0].text for a in alone]
    assert [c.text for c in r.choices] == singles
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens
    _, chunks = sse(server_url, "/v1/completions", {**body, "n": 3, "stream": True})
    texts = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)}
    assert [texts[i] for i in range(3)] == singles
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, n=2)
    one = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    assert [c.message.content for c in chat.choices] == [one.choices[0].message.content] * 2  # greedy: the same
    assert chat.usage.completion_tokens == 2 * one.usage.completion_tokens


def test_echo(client, ref_engine):
    text, _, _ = expected(ref_engine, ref_engine.encode(PROMPT), 4)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + text


def test_penalties_min_tokens_and_stop_token_ids_match_the_engine(client, ref_engine):
    ids = ref_engine.encode("one one one, two two, three")
    free, free_ids, _ = expected(ref_engine, ids, 8, ignore_eos=True)
    params = dict(repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.3, min_tokens=3,
                  stop_token_ids=[free_ids[4]])
    text, out_ids, reason = expected(ref_engine, ids, 8, **params)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, frequency_penalty=0.5,
                                  presence_penalty=0.3, extra_body={"repetition_penalty": 1.4, "min_tokens": 3,
                                                                    "stop_token_ids": [free_ids[4]]})
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (text, reason, len(out_ids))
    assert text != free


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"), ("response_format", {"type": "json_object"}), ("logit_bias", {"42": 5}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("suffix", "end"), ("best_of", 2),
    ("parallel_tool_calls", True), ("colour", "blue"),
])
def test_unimplemented_fields_are_400_naming_them(server_url, field, value):
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": CHAT}),
                       ("/v1/completions", {"model": MODEL, "prompt": PROMPT})):
        r = httpx.post(server_url + path, json={**body, "max_tokens": 1, field: value})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (field, "unsupported_parameter") and field in err["message"]
    bad_message = {"model": MODEL, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}
    assert httpx.post(server_url + "/v1/chat/completions", json=bad_message).json()["error"]["param"] == \
        "messages.0.tool_calls"


def test_echo_with_logprobs_is_refused(server_url):
    r = httpx.post(f"{server_url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_stop_strings_streamed_equals_full_equals_stored(server_url, ref_engine):
    prompt = "Count with words: one, two, three, four, five, six, seven"
    free, _, _ = expected(ref_engine, ref_engine.encode(prompt), 16, ignore_eos=True)
    cut = len(free) // 2
    stops = [free[2:5] + "\u2603", free[cut:cut + 4]]  # a decoy that starts like the text, and a real stop
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stop": stops}
    full = httpx.post(f"{server_url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    rid, chunks = sse(server_url, "/v1/completions", {**body, "stream": True})
    shown = ""
    for c in chunks:
        shown += c["choices"][0]["text"]
        assert full["text"].startswith(shown)  # never text that is cut later
    stored = httpx.get(f"{server_url}/v1/requests/{rid}").json()
    assert shown == full["text"] == stored["text"] == free[: free.find(stops[1])]
    assert full["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"] == stored["finish_reason"] == "stop"


SURROGATE = "bad \ud800 text"


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/completions", {"model": MODEL, "prompt": SURROGATE}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [SURROGATE]}),
    ("POST", "/v1/completions", {"model": SURROGATE, "prompt": "hi"}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "slam": {"policy": SURROGATE}}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": SURROGATE}]}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": SURROGATE}]}]}),
    ("POST", "/tokenize", {"prompt": SURROGATE}),
    ("POST", "/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}),
])
def test_lone_surrogates_are_400(server_url, method, path, body):
    r = httpx.request(method, server_url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("path, content", [
    ("/v1/completions", b'{"model": "SmolLM2-135M-Instruct", "prompt": "\xff\xfe"}'),
    ("/v1/chat/completions", b'{"model": "x", "messages": [{"role": "user", "content": "\xc3"}]}'),
    ("/tokenize", b'{"prompt": "\xed\xa0\x80"}'),
])
def test_undecodable_bodies_are_400(server_url, path, content):
    r = httpx.post(server_url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_odd_request_ids_and_event_ids(server_url):
    for rid in ("%ED%A0%80", "a%2Fb", "x" * 300, "%00", ".."):
        r = httpx.get(f"{server_url}/v1/requests/{rid}")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}, (rid, r.text)
    r = httpx.get(f"{server_url}/v1/requests/cmpl-1/stream", headers={"Last-Event-ID": "-5"})
    assert r.status_code == 400
