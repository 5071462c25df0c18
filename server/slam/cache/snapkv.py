from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from slam.cache.base import CachePolicy, Evicted


@dataclass
class SnapKVPolicy(CachePolicy):
    """SnapKV (Li et al., 2024): the last `observation` queries of each prompt chunk vote, once.

    Votes are pooled over neighbouring positions so that whole phrases survive. Decode steps do not
    vote, as in the paper: the selection is made from the prompt.
    """

    name: ClassVar[str] = "snapkv"
    keeps_scores: ClassVar[bool] = True
    prefill_attention: ClassVar[bool] = True
    observation: int = 32
    pool_kernel: int = 7

    def observe_prefill(self, pool, layer, slot, probs, columns, chunk_pos):
        t = probs.shape[2]
        if t <= 1:
            return None
        votes = probs[:, :, -min(self.observation, t):, :].sum(dim=(1, 2))  # [kv_heads, columns + t]
        pos = torch.cat([pool.pos[layer][slot, :, :columns], chunk_pos.expand(votes.shape[0], -1)], dim=1)
        # Neighbours are neighbours in position, not in column order (the ring wraps); empty columns last.
        order = pos.masked_fill(pos < 0, torch.iinfo(torch.long).max).argsort(dim=1)
        ordered = votes.gather(1, order)
        pooled = F.avg_pool1d(ordered.unsqueeze(1), self.pool_kernel, stride=1, padding=self.pool_kernel // 2)
        pooled = torch.empty_like(votes).scatter_(1, order, pooled.squeeze(1))
        score = pool.score[layer][slot, :, :columns]
        score.copy_(torch.maximum(score, pooled[:, :columns]))
        return pooled[:, columns:]

    def evict_prefill(self, pool, layer, slot, ev: Evicted, evicted_before: int) -> None:
        self.keep_best(pool, layer, slot, ev, self.middle, self.sink)
