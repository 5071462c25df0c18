"""Hot-path functions of one decoder layer's attention over a compressed cache.

They are small top-level functions of tensors so they can be compiled; the policy decides which keys
exist and which of them each query may see.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half

from slam.cache.base import CachePolicy, LayerCache


class Rope:
    """cos/sin tables of the model's rotary embedding, extended on demand, indexed by position."""

    def __init__(self, rotary_emb: torch.nn.Module, head_dim: int, device: torch.device, dtype: torch.dtype):
        self.rotary_emb = rotary_emb
        self.device, self.dtype, self.head_dim = device, dtype, head_dim
        self.cos = torch.empty(0, head_dim, device=device, dtype=dtype)
        self.sin = torch.empty(0, head_dim, device=device, dtype=dtype)

    def _extend(self, upto: int) -> None:
        size = max(upto, 2 * self.cos.shape[0], 4096)
        positions = torch.arange(size, device=self.device).unsqueeze(0)
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]

    def at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at positions pos ([t]) -> two [t, head_dim] tensors."""
        top = int(pos.max()) + 1 if pos.numel() else 0
        if top > self.cos.shape[0]:
            self._extend(top)
        return self.cos[pos], self.sin[pos]

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: [heads, t, head_dim]; pos: [t] -> x rotated to those positions
        return rotate(x, *self.at(pos))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [heads, t, head_dim]; cos, sin: [t, head_dim]
    return x * cos + rotate_half(x) * sin


def attend(
    q: torch.Tensor,  # [q_heads, t, head_dim] queries in the positions keys are compared at
    keys: torch.Tensor,  # [kv_heads, n, head_dim]
    values: torch.Tensor,  # [kv_heads, n, head_dim]
    mask: torch.Tensor | None,  # [kv_heads, t, n] True where the query may attend; None: everywhere
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention; returns the output [q_heads, t, head_dim] and probs [kv_heads, group, t, n]."""
    h, n, d = keys.shape
    t = q.shape[1]
    qg = q.reshape(h, -1, d)  # [kv_heads, group * t, d]; query head j belongs to KV head j // group
    logits = (qg @ keys.transpose(1, 2)).float() * scale  # [kv_heads, group * t, n]
    logits = logits.view(h, -1, t, n)
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [kv_heads, group, t, n]
    out = probs.to(values.dtype).view(h, -1, n) @ values  # [kv_heads, group * t, d]
    return out.view(-1, t, d), probs


def cached_attention(
    policy: CachePolicy,
    cache: LayerCache,
    q: torch.Tensor,  # [q_heads, t, head_dim], before rotation
    k: torch.Tensor,  # [kv_heads, t, head_dim], before rotation
    v: torch.Tensor,  # [kv_heads, t, head_dim]
    pos: torch.Tensor,  # [t] original positions of the new tokens
    cos_sin: tuple[torch.Tensor, torch.Tensor],  # rope.at(pos), computed once per step for all layers
    rope: Rope,
    scale: float,
) -> tuple[torch.Tensor, int]:
    """One request's attention for one layer: select, attend over cache + new tokens, update the cache."""
    q_rot, k_rot = rotate(q, *cos_sin), rotate(k, *cos_sin)
    replaced = policy.select(cache, q_rot, pos)
    kv_heads, t = k.shape[0], k.shape[1]
    values = torch.cat([cache.v, v], dim=1)
    if policy.position_mode == "cache":
        # Keys are stored unrotated; they take positions 0..n+t-1 in cache order, which is original order.
        slots = torch.arange(cache.size + t, device=k.device)
        keys = rope(torch.cat([cache.k, k], dim=1), slots)
        queries = rope(q, slots[cache.size :])
        stored_k = k
    else:
        keys = torch.cat([cache.k, k_rot], dim=1)
        queries = q_rot
        stored_k = k_rot
    mask = None
    if t > 1 or policy.sliding_window:  # A single new token may see every cached key: no mask needed.
        key_pos = torch.cat([cache.pos, pos.expand(kv_heads, t)], dim=1)  # [kv_heads, n + t]
        mask = policy.visible_mask(key_pos, pos)
    out, probs = attend(queries, keys, values, mask, scale)
    policy.update(cache, stored_k, v, pos, probs if policy.needs_attention else None)
    return out, replaced
