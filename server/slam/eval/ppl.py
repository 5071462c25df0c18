"""Perplexity over long text, decoding token by token so each policy evicts exactly as in generation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from slam.config import CacheConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams
from slam.eval.corpus import essays_text


@dataclass
class PplResult:
    policy: str
    budget: int | None
    tokens: int
    ppl: float
    nll: list[float]  # negative log-likelihood of each predicted token, in order
    max_cache_tokens: int

    def curve(self, window: int) -> list[tuple[int, float]]:
        """Perplexity over consecutive windows: (position at the window's end, ppl)."""
        points = []
        for end in range(window, len(self.nll) + 1, window):
            chunk = self.nll[end - window : end]
            points.append((end, math.exp(sum(chunk) / len(chunk))))
        return points


def run_ppl(
    engine: LLMEngine,
    cache: CacheConfig,
    tokens: int,
    on_token: Callable[[], None] | None = None,
) -> PplResult:
    ids = engine.tokenizer.encode(essays_text())[: tokens + 1]
    # Token by token through the decode path, so each policy evicts exactly as in generation.
    sampling = SamplingParams(max_tokens=len(ids) - 1, ignore_eos=True, logprobs=0)
    seq = engine.add_request(ids[:1], sampling, cache)
    seq.forced_ids = ids[1:]
    nll, max_cache = [], 0
    while not seq.finished:
        for out in engine.step():
            if out.error:
                raise RuntimeError(out.error)
            nll.append(-out.logprob)
            max_cache = max(max_cache, out.cache_tokens)
            if on_token:
                on_token()
    ppl = math.exp(sum(nll) / len(nll))
    return PplResult(cache.policy, cache.budget, len(nll), ppl, nll, max_cache)
