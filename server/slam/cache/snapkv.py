from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from slam.cache.base import CachePolicy, LayerCache


@dataclass
class SnapKVPolicy(CachePolicy):
    """SnapKV (Li et al., 2024): the last `observation` queries of each prompt chunk vote, once.

    Votes are pooled over neighbouring positions so that whole phrases survive. Decode steps do not
    vote, as in the paper: the selection is made from the prompt.
    """

    name: ClassVar[str] = "snapkv"
    needs_attention: ClassVar[bool] = True
    observation: int = 32
    pool_kernel: int = 7

    def score(self, cache: LayerCache, probs: torch.Tensor | None, new_tokens: int) -> torch.Tensor:
        if new_tokens <= 1:
            return cache.score
        votes = probs[:, :, -min(self.observation, new_tokens) :, :].sum(dim=(1, 2))  # [kv_heads, n]
        pooled = F.avg_pool1d(votes.unsqueeze(1), self.pool_kernel, stride=1, padding=self.pool_kernel // 2)
        return torch.maximum(cache.score, pooled.squeeze(1))
