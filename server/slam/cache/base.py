"""The cache-policy interface and the per-request, per-layer cache it manages.

A policy is a small dataclass. The base class owns the life cycle of a layer cache in every step:

    select(cache, q)                  before attention: may swap tokens into the active cache (query-aware)
    attention over cache + new keys   done by the model runner, with `visible_mask` from the policy
    update(cache, k, v, pos, probs)   append the new keys, record statistics, evict down to the budget

Eviction keeps the `sink` first tokens and the `window` newest ones and fills the remaining slots with
the middle tokens of highest `score`. A policy usually only defines `score`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class LayerCache:
    """One request's cache for one layer: all tensors are sorted by original position along dim 1."""

    k: torch.Tensor  # [kv_heads, n, head_dim]
    v: torch.Tensor  # [kv_heads, n, head_dim]
    pos: torch.Tensor  # [kv_heads, n] original token positions, int64
    score: torch.Tensor  # [kv_heads, n] policy statistic, float32
    extra: dict = field(default_factory=dict)  # policy-owned state (e.g. the reserve tier)
    rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # RoPE at given positions

    @classmethod
    def empty(cls, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> LayerCache:
        return cls(
            k=torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device),
            v=torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device),
            pos=torch.empty(kv_heads, 0, dtype=torch.long, device=device),
            score=torch.empty(kv_heads, 0, dtype=torch.float32, device=device),
        )

    @property
    def size(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))

    def keep(self, index: torch.Tensor) -> None:
        """Keep the entries at `index` ([kv_heads, m], sorted) and drop the others."""
        d = self.k.shape[-1]
        self.k = self.k.gather(1, index.unsqueeze(-1).expand(-1, -1, d))
        self.v = self.v.gather(1, index.unsqueeze(-1).expand(-1, -1, d))
        self.pos = self.pos.gather(1, index)
        self.score = self.score.gather(1, index)

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        # k, v: [kv_heads, t, head_dim]; pos: [t]
        h, t = k.shape[0], k.shape[1]
        self.k = torch.cat([self.k, k], dim=1)
        self.v = torch.cat([self.v, v], dim=1)
        self.pos = torch.cat([self.pos, pos.to(self.pos.device).expand(h, t)], dim=1)
        self.score = torch.cat([self.score, self.score.new_zeros(h, t)], dim=1)


@dataclass
class CachePolicy:
    """Base of all policies. `budget=None` means unbounded."""

    budget: int | None = None
    sink: int = 4
    recent: int = 64
    position_mode: str = "original"

    name: ClassVar[str] = "base"
    needs_attention: ClassVar[bool] = False  # whether `update` wants the attention probabilities
    sliding_window: ClassVar[bool] = False  # whether each query sees only its own window (plus sinks)

    # --- sizes -------------------------------------------------------------------------------------
    @property
    def window(self) -> int:
        return self.recent

    @property
    def middle_slots(self) -> int:
        return 0 if self.budget is None else max(self.budget - self.sink - self.window, 0)

    # --- hooks ---------------------------------------------------------------------------------------
    def select(self, cache: LayerCache, q: torch.Tensor, q_pos: torch.Tensor) -> int:
        """Before attention: bring query-relevant tokens into the cache. Returns the number replaced."""
        return 0

    def visible_mask(self, key_pos: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """Which keys each query may attend to. key_pos: [kv_heads, n]; q_pos: [t] -> [kv_heads, t, n]."""
        causal = key_pos.unsqueeze(1) <= q_pos.view(1, -1, 1)
        if not self.sliding_window:
            return causal
        in_window = (q_pos.view(1, -1, 1) - key_pos.unsqueeze(1)) < self.window
        return causal & (in_window | (key_pos.unsqueeze(1) < self.sink))

    def score(self, cache: LayerCache, probs: torch.Tensor | None, new_tokens: int) -> torch.Tensor:
        """Importance of each cached token ([kv_heads, n]); higher survives eviction."""
        return cache.score

    def update(
        self,
        cache: LayerCache,
        k: torch.Tensor,  # [kv_heads, t, head_dim]
        v: torch.Tensor,  # [kv_heads, t, head_dim]
        pos: torch.Tensor,  # [t]
        probs: torch.Tensor | None,  # [kv_heads, group, t, n + t] attention over cache + new keys
    ) -> None:
        cache.append(k, v, pos)
        cache.score = self.score(cache, probs, k.shape[1])
        self.on_append(cache)
        if self.budget is not None and cache.size > self.budget:
            self.evict(cache)

    def on_append(self, cache: LayerCache) -> None:
        """Called after new tokens were appended, before eviction (the reserve tier hooks in here)."""

    def evict(self, cache: LayerCache) -> None:
        pos = cache.pos
        newest = pos[:, -1:]
        protected = (pos < self.sink) | (pos > newest - self.window)
        # Protected tokens outrank every middle token; among middle tokens the score decides.
        rank = torch.where(protected, torch.full_like(cache.score, float("inf")), cache.score)
        keep = torch.topk(rank, self.budget, dim=1).indices.sort(dim=1).values
        cache.keep(keep)

    # --- helpers -------------------------------------------------------------------------------------
    def new_cache(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> LayerCache:
        return LayerCache.empty(kv_heads, head_dim, dtype, device)
