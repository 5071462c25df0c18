"""The cache-policy interface: a policy is a selection rule over a slot of the pool.

A slot holds `budget` columns per layer and KV head (engine/pool.py): `[0, sink)` the first tokens,
`[sink, sink + middle)` the middle tokens the policy chooses, and a ring of the `ring` newest tokens
after them. When the ring is full, the token it overwrites is *evicted* and offered to the policy:

    on_evict      slam appends it to the reserve; h2o and snapkv keep it in the middle if it outranks the
                  weakest middle token; streaming drops it
    select        before attention, slam refills the middle from the reserve by the current query
    observe       after attention, h2o and snapkv add the attention each token received to its score

Decode hooks are class methods over all running slots at once (`mine` marks the slots of this policy),
with static shapes so a step can be captured in a CUDA graph; per-slot settings live in the pool.
Prefill hooks run eagerly for one slot and one chunk. Adding a policy: one file with a subclass, one
line in POLICIES, one entry in tests/test_policies.py's POLICY_CASES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

# The engine's SlotPool and StepPlan (engine/pool.py). Not imported: the engine sits above the policies.
SlotPool = StepPlan = Any


@dataclass
class Evicted:
    """Tokens leaving the ring of one slot (prefill) or of every slot (decode, one token each)."""

    k: torch.Tensor  # [..., kv_heads, m, head_dim] as stored (rotated unless position_mode="cache")
    v: torch.Tensor  # [..., kv_heads, m, head_dim]
    pos: torch.Tensor  # [..., m] original positions (the same in every head: they come from the ring)
    score: torch.Tensor  # [..., kv_heads, m] float32
    k_score: torch.Tensor | None = None  # keys rotated at their original positions (position_mode="cache")


@dataclass
class CachePolicy:
    """Base of all policies. `budget=None` means unbounded (only `full`)."""

    budget: int | None = None
    sink: int = 4
    recent: int = 64
    position_mode: str = "original"

    name: ClassVar[str] = "base"
    uses_reserve: ClassVar[bool] = False  # evicted tokens go to the reserve tier (slam)
    keeps_scores: ClassVar[bool] = False  # the middle holds the evicted tokens of highest score
    decode_attention: ClassVar[bool] = False  # observe() wants attention probabilities at decode steps
    prefill_attention: ClassVar[bool] = False  # observe_prefill() wants them for prompt chunks

    # --- layout of a slot ---------------------------------------------------------------------------
    @property
    def ring(self) -> int:
        return self.recent

    @property
    def middle(self) -> int:
        return 0 if self.budget is None else max(self.budget - self.sink - self.ring, 0)

    def counts(self, length: int) -> tuple[int, int, int, int]:
        """(sink, middle, ring, evicted) tokens held after `length` tokens went through the slot."""
        sink = min(length, self.sink)
        ring = min(self.ring, length - sink)
        evicted = length - sink - ring
        return sink, min(self.middle, evicted), ring, evicted

    def reserve_rows(self, length: int) -> int:
        """Reserve rows a slot needs after `length` tokens: its evictions, and at least one middle's worth (the
        picks selection returns) and one row (uses_reserve policies)."""
        return max(self.counts(length)[3], self.middle, 1)

    def columns_used(self, length: int) -> int:
        """Columns [0, n) of the slot that can hold a token (the ring sits at the end of the budget)."""
        return self.budget

    def cache_tokens(self, length: int) -> int:
        sink, middle, ring, _ = self.counts(length)
        return sink + middle + ring

    # --- decode hooks (all slots, static shapes) ----------------------------------------------------
    @classmethod
    def on_evict(cls, pool: SlotPool, layer: int, plan: StepPlan, ev: Evicted, mine: torch.Tensor) -> None:
        """The ring's oldest token of each slot is about to be overwritten (ev: one token per slot)."""
        if not cls.keeps_scores:
            return
        # The evicted token replaces the weakest middle token of its head if it outranks it; an empty
        # middle column ranks lowest. Columns outside the middle never take part.
        b = ev.k.shape[0]
        score = pool.score[layer][:b].masked_fill(pool.pos[layer][:b] < 0, float("-inf"))
        score = score.masked_fill(~plan.is_middle.unsqueeze(1), float("inf"))  # [b, kv_heads, columns]
        weakest, col = score.min(dim=-1)  # [b, kv_heads]
        take = mine.unsqueeze(1) & plan.evict.unsqueeze(1) & (ev.score.squeeze(-1) > weakest)
        col = torch.where(take, col, pool.budget)  # the scratch column otherwise
        ar = torch.arange(b, device=col.device).unsqueeze(1)
        heads = torch.arange(col.shape[1], device=col.device).unsqueeze(0)
        pool.k[layer][ar, heads, col] = ev.k.squeeze(2)
        pool.v[layer][ar, heads, col] = ev.v.squeeze(2)
        pool.pos[layer][ar, heads, col] = torch.where(take, ev.pos.expand_as(col), -1)
        pool.score[layer][ar, heads, col] = ev.score.squeeze(-1)

    @classmethod
    def select(cls, pool: SlotPool, layer: int, plan: StepPlan, q: torch.Tensor, mine: torch.Tensor) -> None:
        """Before attention. q: [slots, q_heads, head_dim], rotated at the original positions."""

    @classmethod
    def observe(cls, pool: SlotPool, layer: int, probs: torch.Tensor, mine: torch.Tensor) -> None:
        """After attention. probs: [slots, kv_heads, group, columns] (only when decode_attention)."""

    # --- prefill hooks (one slot, one chunk, eager) -------------------------------------------------
    def evict_prefill(self, pool: SlotPool, layer: int, slot: int, ev: Evicted, evicted_before: int) -> None:
        """`ev` holds the tokens of this chunk that leave the ring, oldest first."""

    def select_prefill(self, pool: SlotPool, layer: int, slot: int, q: torch.Tensor, evicted: int) -> None:
        """Before a chunk's attention. q: [q_heads, t, head_dim]; `evicted`: tokens evicted so far."""

    def observe_prefill(self, pool: SlotPool, layer: int, slot: int, probs: torch.Tensor, columns: int,
                        chunk_pos: torch.Tensor) -> torch.Tensor | None:
        """probs: [kv_heads, group, t, columns + t] over the slot's columns then the chunk's tokens.
        Updates the slot's scores; returns the chunk tokens' scores [kv_heads, t] (None: zeros)."""
        return None

    # --- checkpoints ----------------------------------------------------------------------------------
    def state(self, pool: SlotPool, slot: int, length: int, reserve_from: int = 0) -> dict[str, torch.Tensor]:
        """A copy (host memory) of what this slot holds after `length` tokens: every column of every layer.

        k, v: [layers, kv_heads, columns, head_dim]; pos, score: [layers, kv_heads, columns]."""
        used = self.columns_used(length)
        copy = lambda group: torch.stack([t[slot, :, :used] for t in group]).to("cpu", copy=True)  # noqa: E731
        return {"k": copy(pool.k), "v": copy(pool.v), "pos": copy(pool.pos), "score": copy(pool.score)}

    def load_state(self, pool: SlotPool, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Put a `state()` back into (another) slot; raises ValueError when it does not fit this pool."""
        for name in ("k", "v", "pos", "score"):
            group, saved = getattr(pool, name), state[name]
            used = saved.shape[2]
            if saved.shape[0] != len(group) or saved.shape[1] != group[0].shape[1] or used > pool.budget \
                    or saved.shape[3:] != group[0].shape[3:]:
                raise ValueError(f"cache {name} has shape {tuple(saved.shape)}; this server's slot is "
                                 f"{(len(group), *group[0].shape[1:])}")
            for layer, t in enumerate(group):
                t[slot, :, :used].copy_(saved[layer])

    # --- shared rule of the score-keeping policies ---------------------------------------------------
    @staticmethod
    def keep_best(pool: SlotPool, layer: int, slot: int, ev: Evicted, middle: int, sink: int) -> None:
        """Middle := the `middle` best of (middle, evicted) by score, per KV head; empty columns lose."""
        if middle == 0:
            return
        cols = slice(sink, sink + middle)
        k, v = pool.k[layer][slot, :, cols], pool.v[layer][slot, :, cols]
        pos, score = pool.pos[layer][slot, :, cols], pool.score[layer][slot, :, cols]
        empty = pos < 0
        heads = k.shape[0]
        cand_k = torch.cat([k, ev.k], dim=1)
        cand_v = torch.cat([v, ev.v], dim=1)
        cand_pos = torch.cat([pos, ev.pos.expand(heads, -1)], dim=1)
        cand_score = torch.cat([score.masked_fill(empty, float("-inf")), ev.score], dim=1)
        best = cand_score.topk(middle, dim=1).indices  # [kv_heads, middle]
        d = k.shape[-1]
        pool.k[layer][slot, :, cols] = cand_k.gather(1, best.unsqueeze(-1).expand(-1, -1, d))
        pool.v[layer][slot, :, cols] = cand_v.gather(1, best.unsqueeze(-1).expand(-1, -1, d))
        pool.pos[layer][slot, :, cols] = cand_pos.gather(1, best)
        pool.score[layer][slot, :, cols] = cand_score.gather(1, best)
