"""Perplexity over long text, decoding token by token so each policy evicts exactly as in generation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slam.config import CacheConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import Sequence
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
    seq = Sequence(ids[:1], cache_config=cache)
    nll, max_cache = [], 0
    for i in range(len(ids) - 1):
        logits = engine.runner.run([(seq, [ids[i]])])[0]  # [vocab]
        seq.num_cached += 1
        nll.append(float(-torch.log_softmax(logits, dim=-1)[ids[i + 1]]))
        max_cache = max(max_cache, seq.cache_tokens())
        if on_token:
            on_token()
    ppl = math.exp(sum(nll) / len(nll))
    return PplResult(cache.policy, cache.budget, len(nll), ppl, nll, max_cache)
