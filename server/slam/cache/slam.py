"""SLAM: sink + recent window + critical middle tokens recalled from a reserve tier by the current query.

Every token that leaves the recent window is appended, once, to the request's reserve (host memory by
default, so accelerator memory stays bounded by the budget). Before each attention the current query
scores the reserve and the highest-scoring tokens become the critical slots of the active cache;
tokens no longer wanted are simply dropped from the active cache, since the reserve still holds them.

The score is an estimate of the attention the query will pay. `sketch_dims` (SparQ-style) reads only
the key channels where the query is largest, then rescores the best candidates exactly; 0 scores all
reserve keys exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slam.cache.base import CachePolicy, LayerCache


class Reserve:
    """Append-only store of evicted middle tokens for one layer, grown by doubling."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.n = 0
        self.next_pos = 0  # every middle token below this original position is stored
        self.k = torch.empty(kv_heads, 64, head_dim, dtype=dtype, device=device)  # keys as the cache stores them
        self.v = torch.empty_like(self.k)
        self.k_score = self.k  # keys rotated at their original positions; the same tensor in "original" mode
        self.pos = torch.empty(64, dtype=torch.long, device=device)

    def _grow(self, need: int) -> None:
        cap = self.k.shape[1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        shared = self.k_score is self.k

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty(t.shape[0], new_cap, t.shape[2])
            out[:, : self.n] = t[:, : self.n]
            return out

        self.k, self.v = grown(self.k), grown(self.v)
        pos = self.pos.new_empty(new_cap)
        pos[: self.n] = self.pos[: self.n]
        self.pos = pos
        self.k_score = self.k if shared else grown(self.k_score)

    def append(self, k: torch.Tensor, v: torch.Tensor, k_score: torch.Tensor | None, pos: torch.Tensor) -> None:
        # k, v, k_score: [kv_heads, m, head_dim]; pos: [m]
        m = k.shape[1]
        if k_score is not None and self.k_score is self.k:
            self.k_score = self.k.clone()
        self._grow(self.n + m)
        dev = self.k.device
        self.k[:, self.n : self.n + m] = k.to(dev)
        self.v[:, self.n : self.n + m] = v.to(dev)
        if self.k_score is not self.k:
            self.k_score[:, self.n : self.n + m] = (k if k_score is None else k_score).to(dev)
        self.pos[self.n : self.n + m] = pos.to(dev)
        self.n += m

    def nbytes(self) -> int:
        tensors = [self.k, self.v] + ([] if self.k_score is self.k else [self.k_score])
        return sum(t.shape[0] * t.shape[2] * t.element_size() for t in tensors) * self.n


@dataclass
class SlamPolicy(CachePolicy):
    name: ClassVar[str] = "slam"
    reserve_device: str = "cpu"
    sketch_dims: int = 0
    sketch_candidates: int = 4  # exact rescoring of this many times the critical slots

    def on_append(self, cache: LayerCache) -> None:
        reserve: Reserve | None = cache.extra.get("reserve")
        if reserve is None:
            reserve = Reserve(cache.k.shape[0], cache.k.shape[2], cache.k.dtype, self.reserve_device)
            reserve.next_pos = self.sink
            cache.extra["reserve"] = reserve
        newest = int(cache.pos[0, -1])
        leaving_upto = newest - self.window + 1  # positions below this have left the window
        if leaving_upto <= reserve.next_pos:
            return
        # Tokens at or above next_pos are the same in every head (critical tokens all lie below it).
        row = cache.pos[0]
        idx = ((row >= reserve.next_pos) & (row < leaving_upto)).nonzero().squeeze(1)
        k, v = cache.k[:, idx], cache.v[:, idx]
        pos = row[idx]
        k_score = cache.rotate(k, pos) if self.position_mode == "cache" else None
        reserve.append(k, v, k_score, pos)
        reserve.next_pos = leaving_upto

    def evict(self, cache: LayerCache) -> None:
        # The next step selects critical tokens from the reserve anyway, so eviction needs no scores:
        # keep the sink, the oldest middle tokens up to the critical slots, and the window. Rows share
        # these counts because sink and window are the same positions in every head.
        row = cache.pos[0]
        head = int((row < self.sink).sum()) + self.middle_slots
        window = cache.size - int((row <= row[-1] - self.window).sum())
        for name in ("k", "v", "pos", "score"):
            t = getattr(cache, name)
            setattr(cache, name, torch.cat([t[:, :head], t[:, t.shape[1] - window :]], dim=1))

    def estimate(self, q: torch.Tensor, reserve: Reserve) -> torch.Tensor:
        """Approximate attention of the queries on every reserve token. q: [q_heads, t, d] -> [kv_heads, n]."""
        keys = reserve.k_score[:, : reserve.n]  # [kv_heads, n, d]
        h, n, d = keys.shape
        qg = q.to(keys.device, keys.dtype).reshape(h, -1, d)  # [kv_heads, group * t, d]
        if self.sketch_dims and self.sketch_dims < d:
            channels = qg.abs().sum(dim=1).topk(self.sketch_dims, dim=-1).indices  # [kv_heads, r]
            q_r = qg.gather(2, channels.unsqueeze(1).expand(-1, qg.shape[1], -1))
            k_r = keys.gather(2, channels.unsqueeze(1).expand(-1, n, -1))
            rough = (q_r @ k_r.transpose(1, 2)).amax(dim=1)  # [kv_heads, n]
            m = min(n, self.middle_slots * self.sketch_candidates)
            cand = rough.topk(m, dim=1).indices  # [kv_heads, m]
            exact = torch.softmax(qg @ keys.gather(1, cand.unsqueeze(-1).expand(-1, -1, d)).transpose(1, 2) * d**-0.5, dim=-1).amax(dim=1)
            out = torch.full((h, n), -1.0, device=keys.device)
            return out.scatter(1, cand, exact.float())
        return torch.softmax((qg @ keys.transpose(1, 2)).float() * d**-0.5, dim=-1).amax(dim=1)

    def select(self, cache: LayerCache, q: torch.Tensor, q_pos: torch.Tensor) -> int:
        reserve: Reserve | None = cache.extra.get("reserve")
        slots = self.middle_slots
        if reserve is None or reserve.n <= slots:
            return 0  # every middle token is still in the active cache
        chosen = self.estimate(q, reserve).topk(slots, dim=1).indices.sort(dim=1).values  # [kv_heads, slots]
        row = cache.pos[0]
        head = int((row < self.sink).sum())
        tail_start = int((row < reserve.next_pos).sum())
        old_pos = cache.pos[:, head:tail_start]  # [kv_heads, current critical]
        new_pos = reserve.pos[chosen].to(cache.pos.device)
        kept = (new_pos.unsqueeze(-1) == old_pos.unsqueeze(1)).any(-1)  # [kv_heads, slots]
        d = cache.k.shape[-1]
        gather = chosen.unsqueeze(-1).expand(-1, -1, d)
        dev = cache.k.device
        crit_k = reserve.k.gather(1, gather.to(reserve.k.device)).to(dev)
        crit_v = reserve.v.gather(1, gather.to(reserve.v.device)).to(dev)
        cache.k = torch.cat([cache.k[:, :head], crit_k, cache.k[:, tail_start:]], dim=1)
        cache.v = torch.cat([cache.v[:, :head], crit_v, cache.v[:, tail_start:]], dim=1)
        cache.pos = torch.cat([cache.pos[:, :head], new_pos, cache.pos[:, tail_start:]], dim=1)
        cache.score = torch.cat(
            [cache.score[:, :head], cache.score.new_zeros(new_pos.shape), cache.score[:, tail_start:]], dim=1
        )
        return int((~kept).sum())
