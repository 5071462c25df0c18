"""SLAM: sink + recent ring + critical middle tokens recalled from a reserve tier by the current query.

Every token that leaves the ring is appended, once, to the slot's reserve (engine/pool.py). Before
attention the current query scores the reserve (softmax of q.k, maximised over the KV head's query group;
every token, or in two stages through chunk bounds: cache/selection.py) and the best `middle` tokens
fill the critical columns. The active cache stays bounded by
the budget; the reserve grows with the context, on the device or in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slam.cache import cpu_kernels, fused
from slam.cache.base import CachePolicy, Evicted
from slam.cache.selection import chunk_top, group_scores, select_reserve


def place(pool, layer: int, plan, idx: torch.Tensor, score: torch.Tensor, mine: torch.Tensor) -> None:
    """Columns [sink, sink + middle) of each slam slot of [0, b) take the chosen reserve tokens idx [b,
    kv_heads, kc], best first (a score of -inf: nothing found), those chosen again staying where they are
    (keep_columns); counts the newcomers into pool.replaced (churn)."""
    b, kc = idx.shape[0], idx.shape[2]
    col, usable, col_rows = middle_columns(pool, plan, mine, kc)
    if pool.cpu_kernels and not pool.reserve_int8:
        return cpu_kernels.place(pool, layer, idx, score, col)
    idx, score, fresh = keep_columns(pool.ridx[layer][:b].gather(2, col), idx, score, usable)
    found = score > float("-inf")
    rows = pool.reserve_rows(idx)
    k, v = pool.reserve_gather(layer, idx, "k", rows), pool.reserve_gather(layer, idx, "v", rows)
    rpos = plan.once("slam rpos", lambda: pool.rpos[:b].unsqueeze(1).expand(-1, pool.kv_heads, -1))
    pos = torch.where(found, rpos.gather(2, idx), -1)
    pool.replaced[:b] += fresh
    pool.write_columns(layer, col_rows, k, v, pos, torch.where(found, idx, -1))


def keep_columns(held: torch.Tensor, idx: torch.Tensor, score: torch.Tensor, usable: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Picks idx, score [b, kv_heads, kc], best first, rearranged so that entry j is what the step's column j
    takes: a token chosen again stays in the column that holds it (held [b, kv_heads, kc]: the columns'
    reserve indices), newcomers fill the other columns in pick order, and columns left over are emptied
    (score -inf). Only columns where `usable` take anything. A CPU's placement is bound by copying rows out
    of a reserve far larger than its caches; this way it copies only the newcomers (the C++ op does the same).
    Also returns the newcomers per slot [b]: the churn."""
    b, h, kc = idx.shape
    none = float("-inf")
    chosen = usable & (score > none)
    held = torch.where(usable & (held >= 0), held, -1)
    by_token, column = held.sort(dim=-1, stable=True)  # a token in two columns (never in a running pool): the first
    at = torch.searchsorted(by_token, idx).clamp_max(kc - 1)
    hit = chosen & (by_token.gather(2, at) == idx)
    home = column.gather(2, at)  # where a token chosen again lies
    picks = torch.where(chosen, idx, -1).sort(dim=-1).values
    again = picks.gather(2, torch.searchsorted(picks, held).clamp_max(kc - 1)) == held
    own = column.gather(2, torch.searchsorted(by_token, held).clamp_max(kc - 1))  # the column a held token keeps
    first = own == torch.arange(kc, device=idx.device)
    kept = (held >= 0) & again & first
    open_first = (~(usable & ~kept)).to(torch.int8).argsort(dim=-1, stable=True)  # free columns first, in order
    newcomer = chosen & ~hit
    nth = (newcomer.cumsum(dim=-1) - 1).clamp_min(0)
    dest = torch.where(hit, home, torch.where(newcomer, open_first.gather(2, nth), kc))  # kc: dropped
    out_idx = torch.zeros(b, h, kc + 1, dtype=idx.dtype, device=idx.device).scatter_(2, dest, idx)
    out_score = torch.full((b, h, kc + 1), none, dtype=score.dtype, device=score.device).scatter_(2, dest, score)
    return out_idx[..., :kc], out_score[..., :kc], newcomer.sum(dim=(1, 2))


def middle_columns(pool, plan, mine: torch.Tensor, kc: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's columns for slam's kc picks (pool.middle_columns), whether each is a real column, and their
    flat rows: the same for every layer of a step."""
    def make():
        col = pool.middle_columns(plan.sink, torch.where(mine, plan.middle, 0), kc)  # [b, kv_heads, kc]
        return col, col < pool.budget, pool.column_rows(col)

    return plan.once(("slam columns", kc), make)


@dataclass
class SlamPolicy(CachePolicy):
    name: ClassVar[str] = "slam"
    uses_reserve: ClassVar[bool] = True

    @classmethod
    def on_evict(cls, pool, layer, plan, ev: Evicted, mine) -> None:
        # Slots that evict nothing, or use another policy, write to the reserve's scratch index.
        slots = pool.slot_index[: ev.k.shape[0]]
        k_score = None if ev.k_score is None else ev.k_score.squeeze(2)
        pool.append_evicted(layer, plan.reserve_at, ev.k.squeeze(2), ev.v.squeeze(2), k_score)
        if layer == 0:
            pool.rpos[slots, plan.reserve_at] = torch.where(plan.reserve_at < pool.cap, ev.pos.squeeze(1), -1)

    @classmethod
    def select(cls, pool, layer, plan, q, mine) -> None:
        b, kc = q.shape[0], plan.kc
        if kc == 0:
            return
        qg = q.view(b, pool.kv_heads, -1, pool.head_dim)  # [b, kv_heads, group, head_dim]
        limit = plan.once(("slam limit", kc), lambda: torch.where(mine, plan.middle, kc).clamp(1, kc))  # [b]
        # idx, score: [b, kv_heads, kc]
        idx, score = select_reserve(pool, layer, qg, plan.reserve_n, kc, plan.span, plan.refresh, limit)
        (fused.place if pool.fused else place)(pool, layer, plan, idx, score, mine)

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
                pool.rks[layer][part] = state["rks"][layer].to(pool.device, pool.dtype)
        pool.rpos[slot, start : start + m] = state["rpos"].to(pool.device)
        for layer in range(pool.layers):
            pool.summarize(layer, slot, start, start + m)
        self._index_middle(pool, slot, start + m)

    @staticmethod
    def _choose_chunks(pool, layer: int, slot: int, q: torch.Tensor, evicted: int) -> None:
        """Stage one's chunks for the decode steps before this layer's first refresh (select_every > 1): the
        best by the prompt's last query, best first, as many as the slot's candidate buffer holds."""
        width = pool.cand[layer].shape[2]
        bounds = pool.bounds_of(layer, slice(slot, slot + 1), max(-(-evicted // pool.chunk), width))
        qg = q[:, -1:].reshape(1, pool.kv_heads, -1, pool.head_dim)  # [1, kv_heads, group, head_dim]
        n = torch.full((1,), evicted, device=q.device)  # a fill, not a copy that would wait for the stream
        pool.cand[layer][slot] = chunk_top(qg, *bounds, n, width, pool.chunk, pool.head_dim**-0.5, best_first=True)[0]

    def _index_middle(self, pool, slot: int, n: int) -> None:
        """Recover which reserve token each middle column holds (counted by churn) from the positions a
        state keeps: reserve index i holds position rpos[i]."""
        rpos = pool.rpos[slot, :n]
        stored = rpos >= 0
        if not bool(stored.any()):
            return
        inverse = torch.full((int(rpos.max()) + 1,), -1, dtype=torch.long, device=rpos.device)
        inverse[rpos[stored]] = torch.arange(n, device=rpos.device)[stored]
        cols = slice(self.sink, self.sink + self.middle)
        for layer in range(pool.layers):
            p = pool.pos[layer][slot, :, cols]
            known = (p >= 0) & (p < inverse.numel())
            pool.ridx[layer][slot, :, cols] = torch.where(known, inverse[p.clamp(0, inverse.numel() - 1)], -1)

    def evict_prefill(self, pool, layer, slot, ev: Evicted, evicted_before: int) -> None:
        m = ev.k.shape[1]
        pool.ensure_reserve(evicted_before + m)
        idx = (slot, slice(None), slice(evicted_before, evicted_before + m))
        pool.reserve_write(layer, idx, ev.k, ev.v)
        if ev.k_score is not None:
            pool.rks[layer][idx] = ev.k_score
        if layer == 0:
            pool.rpos[slot, evicted_before : evicted_before + m] = ev.pos
        pool.summarize(layer, slot, evicted_before, evicted_before + m)

    def select_prefill(self, pool, layer, slot, q, evicted) -> None:
        kc = min(evicted, self.middle)
        if kc == 0:
            return
        if pool.two_stage and pool.select_every > 1:
            self._choose_chunks(pool, layer, slot, q, evicted)
        part = (slot, slice(None), slice(0, evicted))  # this slot's reserve only, dequantized if int8
        stored_k = pool.reserve_keys_at(layer, part)  # [kv_heads, evicted, head_dim]
        keys = pool.rks[layer][part].to(pool.device) if pool.cache_positions else stored_k
        qg = q.reshape(1, pool.kv_heads, -1, pool.head_dim)  # the group's queries of every chunk token
        stored = (pool.rpos[slot : slot + 1, :evicted] >= 0).unsqueeze(1)
        idx = group_scores(qg, keys.to(q.dtype).unsqueeze(0), stored, pool.head_dim**-0.5)[0]
        idx = idx.topk(kc, dim=-1).indices  # [kv_heads, kc]
        rows = idx.unsqueeze(-1).expand(-1, -1, pool.head_dim)
        cols = slice(self.sink, self.sink + kc)
        pool.k[layer][slot, :, cols] = stored_k.gather(1, rows)
        pool.v[layer][slot, :, cols] = pool.reserve_values_at(layer, part).gather(1, rows)
        pool.pos[layer][slot, :, cols] = pool.rpos[slot, :evicted].expand(pool.kv_heads, -1).gather(1, idx)
        pool.ridx[layer][slot, :, cols] = idx
