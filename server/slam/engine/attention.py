"""Hot-path functions of attention over the slot pool: small top-level functions of tensors, so a decode
step can be compiled or captured in a CUDA graph. Shapes in comments: b slots, H KV heads, G queries per
KV head, C pool columns (budget + 1), D head_dim, t new tokens of a prefill chunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Rope:
    """cos/sin tables of the model's rotary embedding by position, grown eagerly (never inside a graph)."""

    def __init__(self, rotary_emb: torch.nn.Module, head_dim: int, device: torch.device, dtype: torch.dtype):
        self.rotary_emb, self.head_dim, self.device, self.dtype = rotary_emb, head_dim, device, dtype
        self.cos = torch.empty(0, head_dim, device=device, dtype=dtype)
        self.sin = torch.empty(0, head_dim, device=device, dtype=dtype)

    def ensure(self, upto: int) -> bool:
        """Make the tables cover positions [0, upto); True when they were reallocated."""
        if upto <= self.cos.shape[0]:
            return False
        size = max(upto, 2 * self.cos.shape[0], 4096)
        positions = torch.arange(size, device=self.device).unsqueeze(0)
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        return True


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x [..., D] with cos, sin broadcastable to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys rotated at the same positions (one fused kernel when compiled)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


def decode_mask(pos: torch.Tensor, cols: torch.Tensor, scratch: int, active: torch.Tensor) -> torch.Tensor:
    """Which pool columns a decode query attends to: pos [b, H, C] -> [b, H, 1, C]. An inactive slot attends
    to its scratch column: a row with no key at all would turn NaN, and its NaN keys and values would land in
    that column for the slot's next request to read."""
    return ((pos >= 0) | (cols == scratch) & ~active.view(-1, 1, 1)).unsqueeze(2)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum x + y and its RMS norm (GPUs: one kernel when compiled)."""
    x = x + y
    return x, F.rms_norm(x, weight.shape, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: silu(gate) * up of [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def cache_ranks(pos: torch.Tensor) -> torch.Tensor:
    """Rank of each column among the valid ones by original position (position_mode="cache").

    pos: [..., C] with -1 for empty columns -> [..., C] ranks 0..n-1 (empty columns get ranks >= n)."""
    key = pos.masked_fill(pos < 0, torch.iinfo(torch.long).max)
    order = key.argsort(dim=-1)
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(pos.shape[-1], device=pos.device).expand_as(order))


def expand_mask(valid: torch.Tensor, group: int) -> torch.Tensor:
    """A per-KV-head mask [b, H, t, C] for all query heads [b, H * G, t, C]."""
    return valid.repeat_interleave(group, dim=1) if group > 1 else valid


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA over the pool. q: [b, H*G, t, D]; k, v: [b, H, C, D]; valid: [b, H, t, C] bool."""
    mask = expand_mask(valid, q.shape[1] // k.shape[1])
    return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def attend_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the probabilities [b, H, G, t, C] (for policies that score tokens)."""
    b, qh, t, d = q.shape
    probs = attention_probs(q, k, valid, scale)
    out = probs.to(v.dtype) @ v.unsqueeze(2)  # [b, H, G, t, D]
    return out.view(b, qh, t, d), probs


def attention_probs(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """The attention probabilities [b, H, G, t, C] of q [b, H*G, t, D] over k [b, H, C, D]."""
    b, qh, t, d = q.shape
    qg = q.view(b, k.shape[1], -1, t, d)  # query head j belongs to KV head j // G
    logits = (qg @ k.unsqueeze(2).transpose(-1, -2)).float() * scale  # [b, H, G, t, C]
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    return torch.softmax(logits, dim=-1)
