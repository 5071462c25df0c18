"""`slam bench serve`: a closed-loop load generator over streaming completions.

`concurrency` workers each send one request at a time until `requests` are done. Prompts are exact
token-id lists (built from the server's own /tokenize) and `ignore_eos` makes every request generate
exactly `max_tokens`, so runs are comparable. Times come from the client side of the SSE stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field

import httpx
from pydantic import BaseModel, Field

FILLER = ("The quick brown fox jumps over the lazy dog while the river runs to the sea and the "
          "mountains keep their snow through the long summer days. ")


class BenchError(Exception):
    """The server could not be benchmarked (unreachable, refused the setup calls)."""


class BenchConfig(BaseModel):
    url: str = "http://127.0.0.1:8000"
    concurrency: int = Field(default=4, ge=1)
    requests: int = Field(default=32, ge=1)
    prompt_tokens: int = Field(default=256, ge=1)
    max_tokens: int = Field(default=64, ge=1)
    api_key: str | None = None
    model: str | None = None
    progress: bool = True
    timeout_s: float = 600.0


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


@dataclass
class BenchResult:
    config: BenchConfig
    duration_s: float
    results: list[RequestResult]

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> int:
        return len(self.results) - len(self.ok)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)

    def summary(self) -> dict:
        ttfts = [r.ttft for r in self.ok]
        itls = [x for r in self.ok for x in r.itls]
        return {
            "url": self.config.url, "concurrency": self.config.concurrency, "requests": len(self.results),
            "failed": self.failed, "prompt_tokens": self.config.prompt_tokens, "max_tokens": self.config.max_tokens,
            "duration_s": round(self.duration_s, 3), "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.output_tokens / self.duration_s, 2) if self.duration_s else 0.0,
            "requests_per_s": round(len(self.ok) / self.duration_s, 3) if self.duration_s else 0.0,
            "ttft_p50_ms": _ms(percentile(ttfts, 50)), "ttft_p99_ms": _ms(percentile(ttfts, 99)),
            "itl_p50_ms": _ms(percentile(itls, 50)), "itl_p99_ms": _ms(percentile(itls, 99)),
            "errors": sorted({r.error for r in self.results if not r.ok})[:5],
        }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _setup(client: httpx.AsyncClient, config: BenchConfig) -> tuple[str, list[int]]:
    try:
        models = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {config.url}: {exc}") from exc
    if models.status_code != 200:
        raise BenchError(f"GET /v1/models answered {models.status_code}: {models.text[:200]}")
    model = config.model or models.json()["data"][0]["id"]
    text = FILLER * (config.prompt_tokens // 20 + 2)
    tok = await client.post("/tokenize", json={"prompt": text})
    if tok.status_code != 200:
        raise BenchError(f"POST /tokenize answered {tok.status_code}: {tok.text[:200]}")
    ids = tok.json()["tokens"]
    while len(ids) < config.prompt_tokens + config.requests:
        ids = ids + ids
    return model, ids


async def _one(client: httpx.AsyncClient, model: str, prompt: list[int], config: BenchConfig) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": config.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    last, result = start, RequestResult(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(ok=False, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(ok=False, error=chunk["error"].get("message", "error")[:100])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    except httpx.HTTPError as exc:
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:100])
    result.ok = result.ttft > 0
    return result


async def _run(config: BenchConfig) -> BenchResult:
    headers = {}
    key = config.api_key or os.environ.get("SLAM_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    limits = httpx.Limits(max_connections=config.concurrency + 2)
    async with httpx.AsyncClient(base_url=config.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=config.timeout_s) as client:
        model, ids = await _setup(client, config)
        todo = list(range(config.requests))
        results: list[RequestResult] = []
        bar = None
        if config.progress:
            from tqdm import tqdm

            bar = tqdm(total=config.requests, desc=f"bench c={config.concurrency}", unit="req", leave=False)

        async def worker() -> None:
            while todo:
                i = todo.pop()
                # A different window of the filler per request: same length, different tokens.
                results.append(await _one(client, model, ids[i : i + config.prompt_tokens], config))
                if bar is not None:
                    bar.update(1)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return BenchResult(config, duration, results)


def run_bench(config: BenchConfig) -> BenchResult:
    return asyncio.run(_run(config))
