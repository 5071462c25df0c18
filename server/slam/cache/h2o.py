from dataclasses import dataclass
from typing import ClassVar

import torch

from slam.cache.base import CachePolicy, Evicted


@dataclass
class H2OPolicy(CachePolicy):
    """H2O (Zhang et al., 2023): keep the heavy hitters, the tokens with the most accumulated attention."""

    name: ClassVar[str] = "h2o"
    keeps_scores: ClassVar[bool] = True
    decode_attention: ClassVar[bool] = True
    prefill_attention: ClassVar[bool] = True

    @classmethod
    def observe(cls, pool, layer, probs, mine) -> None:
        # probs: [slots, kv_heads, group, columns]; every query of the group adds the attention it paid.
        b = probs.shape[0]
        pool.score[layer][:b] += torch.where(mine.view(-1, 1, 1), probs.sum(dim=2), 0.0)

    def observe_prefill(self, pool, layer, slot, probs, columns, chunk_pos):
        received = probs.sum(dim=(1, 2))  # [kv_heads, columns + t]
        pool.score[layer][slot] += received[:, :columns]
        return received[:, columns:]

    def evict_prefill(self, pool, layer, slot, ev: Evicted, evicted_before: int) -> None:
        self.keep_best(pool, layer, slot, ev, self.middle, self.sink)
