from dataclasses import dataclass
from typing import ClassVar

import torch

from slam.cache.base import CachePolicy, LayerCache


@dataclass
class H2OPolicy(CachePolicy):
    """H2O (Zhang et al., 2023): keep the heavy hitters, the tokens with the most accumulated attention."""

    name: ClassVar[str] = "h2o"
    needs_attention: ClassVar[bool] = True

    def score(self, cache: LayerCache, probs: torch.Tensor | None, new_tokens: int) -> torch.Tensor:
        # probs: [kv_heads, group, t, n]; every query of the group adds the attention it paid.
        return cache.score + probs.sum(dim=(1, 2))
