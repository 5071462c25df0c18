"""SLAM: sink + recent ring + critical middle tokens recalled from a reserve tier by the current query.

Every token that leaves the ring is appended, once, to the slot's reserve (engine/pool.py). Before each
attention the current query scores every reserve token (softmax of q.k, maximised over the KV head's
query group) and the best `middle` tokens fill the critical columns. The active cache stays bounded by
the budget; the reserve grows with the context, on the device or in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slam.cache.base import CachePolicy, Evicted


def reserve_scores(q: torch.Tensor, keys: torch.Tensor, n: torch.Tensor, scale: float,
                   rpos: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each query would pay each reserve token, max over the group (and queries).

    q: [slots, kv_heads, queries, head_dim]; keys: [slots, kv_heads, cap, head_dim]; n: [slots] tokens
    stored -> [slots, kv_heads, cap], -1 where nothing is stored.
    """
    logits = (q @ keys.transpose(-1, -2)).float() * scale  # [slots, kv_heads, queries, cap]
    stored = torch.arange(keys.shape[2], device=keys.device) < n.view(-1, 1)  # [slots, cap]
    if rpos is not None:
        stored &= rpos >= 0  # a reserve restored without its tokens holds none
    logits = logits.masked_fill(~stored.view(stored.shape[0], 1, 1, -1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).amax(dim=2)  # NaN where a slot stores nothing
    return torch.where(stored.unsqueeze(1), probs, -1.0)


@dataclass
class SlamPolicy(CachePolicy):
    name: ClassVar[str] = "slam"
    uses_reserve: ClassVar[bool] = True

    @classmethod
    def on_evict(cls, pool, layer, plan, ev: Evicted, mine) -> None:
        # Slots that evict nothing, or use another policy, write to the reserve's scratch index.
        b = ev.k.shape[0]
        ar = torch.arange(b, device=plan.reserve_at.device)
        idx = plan.reserve_at.to(pool.reserve_device, non_blocking=True)
        ar_r = ar.to(pool.reserve_device, non_blocking=True)
        pool.reserve_write(layer, (ar_r, slice(None), idx), ev.k.squeeze(2), ev.v.squeeze(2))
        if ev.k_score is not None:
            pool.rks[layer][ar_r, :, idx] = ev.k_score.squeeze(2).to(pool.reserve_device, non_blocking=True)
        if layer == 0:
            pool.rpos[ar, plan.reserve_at] = torch.where(plan.reserve_at < pool.cap, ev.pos.squeeze(1), -1)

    @classmethod
    def select(cls, pool, layer, plan, q, mine) -> None:
        b, kc = q.shape[0], plan.kc
        if kc == 0:
            return
        keys = pool.reserve_keys(layer, scoring=True)[:b]
        qg = q.view(b, pool.kv_heads, -1, pool.head_dim)  # [b, kv_heads, group, head_dim]
        scores = reserve_scores(qg, keys, plan.reserve_n, pool.head_dim**-0.5, pool.rpos[:b])
        top = scores.topk(kc, dim=-1)  # [b, kv_heads, kc]
        idx = top.indices
        d = pool.head_dim
        stored_k = keys if not pool.cache_positions else pool.reserve_keys(layer)[:b]
        k = stored_k.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
        v = pool.reserve_values(layer)[:b].gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
        pos = pool.rpos[:b].unsqueeze(1).expand(-1, pool.kv_heads, -1).gather(2, idx)
        pos = torch.where(top.values >= 0, pos, -1)
        j = torch.arange(kc, device=q.device)
        col = torch.where(mine.view(-1, 1) & (j < plan.middle.view(-1, 1)), plan.sink.view(-1, 1) + j, pool.budget)
        col = col.unsqueeze(1).expand(-1, pool.kv_heads, -1)  # [b, kv_heads, kc]
        before = pool.pos[layer][:b].gather(2, col)
        pool.k[layer][:b].scatter_(2, col.unsqueeze(-1).expand(-1, -1, -1, d), k)
        pool.v[layer][:b].scatter_(2, col.unsqueeze(-1).expand(-1, -1, -1, d), v)
        pool.pos[layer][:b].scatter_(2, col, pos)
        pool.pos[layer][:, :, pool.budget] = -1  # the scratch column stays empty
        # Churn: chosen tokens that were not in the middle before this step.
        old = before.masked_fill(before < 0, -2).sort(dim=-1).values
        hit = old.gather(2, torch.searchsorted(old, pos).clamp_max(kc - 1)) == pos
        pool.replaced[:b] += ((~hit) & (pos >= 0) & (col < pool.budget)).sum(dim=(1, 2))

    def state(self, pool, slot, length, reserve_from=0):
        """Adds the reserve tokens [reserve_from, n) of the slot: rk, rv (and rks) [layers, kv_heads, m,
        head_dim] in the cache dtype, rpos [m]."""
        out = super().state(pool, slot, length)
        n = min(self.counts(length)[3], pool.cap)
        part = (slot, slice(None), slice(reserve_from, n))
        out["rk"] = torch.stack([pool.reserve_keys_at(layer, part) for layer in range(pool.layers)]).cpu()
        out["rv"] = torch.stack([pool.reserve_values_at(layer, part) for layer in range(pool.layers)]).cpu()
        if pool.cache_positions:
            out["rks"] = torch.stack([t[part] for t in pool.rks]).to("cpu", copy=True)
        out["rpos"] = pool.rpos[slot, reserve_from:n].to("cpu", copy=True)
        out["reserve_from"] = torch.tensor(reserve_from)
        return out

    def load_state(self, pool, slot, state):
        super().load_state(pool, slot, state)
        if "rk" not in state:
            return  # restored without its reserve: only tokens evicted from now on can be recalled
        start, m = int(state["reserve_from"]), state["rk"].shape[2]
        pool.ensure_reserve(max(start + m, self.middle, 1))
        part = (slot, slice(None), slice(start, start + m))
        for layer in range(pool.layers):
            pool.reserve_write(layer, part, state["rk"][layer].to(pool.device), state["rv"][layer].to(pool.device))
            if pool.cache_positions:
                pool.rks[layer][part] = state["rks"][layer].to(pool.reserve_device)
        pool.rpos[slot, start : start + m] = state["rpos"].to(pool.device)

    def evict_prefill(self, pool, layer, slot, ev: Evicted, evicted_before: int) -> None:
        m = ev.k.shape[1]
        pool.ensure_reserve(evicted_before + m)
        idx = (slot, slice(None), slice(evicted_before, evicted_before + m))
        pool.reserve_write(layer, idx, ev.k, ev.v)
        if ev.k_score is not None:
            pool.rks[layer][idx] = ev.k_score.to(pool.reserve_device)
        if layer == 0:
            pool.rpos[slot, evicted_before : evicted_before + m] = ev.pos

    def select_prefill(self, pool, layer, slot, q, evicted) -> None:
        kc = min(evicted, self.middle)
        if kc == 0:
            return
        keys = pool.reserve_keys(layer, scoring=True)[slot : slot + 1, :, :evicted]
        qg = q.reshape(1, pool.kv_heads, -1, pool.head_dim)  # the group's queries of every chunk token
        n = torch.tensor([evicted], device=pool.device)
        idx = reserve_scores(qg, keys, n, pool.head_dim**-0.5, pool.rpos[slot : slot + 1, :evicted])[0]
        idx = idx.topk(kc, dim=-1).indices  # [kv_heads, kc]
        d = pool.head_dim
        stored_k = keys[0] if not pool.cache_positions else pool.reserve_keys(layer)[slot, :, :evicted]
        cols = slice(self.sink, self.sink + kc)
        pool.k[layer][slot, :, cols] = stored_k.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        pool.v[layer][slot, :, cols] = pool.reserve_values(layer)[slot, :, :evicted].gather(
            1, idx.unsqueeze(-1).expand(-1, -1, d))
        pool.pos[layer][slot, :, cols] = pool.rpos[slot, :evicted].expand(pool.kv_heads, -1).gather(1, idx)
