"""Batched token selection on the device: greedy, or temperature with top-k and top-p, per request.

Randomness is counter-based: the noise for request r at generation step s is a hash of (seed_r, s, token
id), turned into Gumbel noise, so `argmax(logits / T + noise)` samples softmax(logits / T). A request's
draws depend only on its seed and how many tokens it has generated: batching, restore on another replica
or another device give the same tokens, and the checkpoint needs only the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer hash (lowbias32) on int64 tensors holding uint32 values; the masks keep it exact.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise [b, vocab] from seeds [b] and steps [b] (int64)."""
    h = _mix(_mix((seeds >> 32) & _M32) ^ (seeds & _M32))
    h = _mix(h ^ _mix(steps & _M32))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    x = _mix(h.unsqueeze(1) ^ ((ids * 0x9E3779B9) & _M32))
    return ((x >> 8).float() + 0.5) / float(1 << 24)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors."""

    temperature: torch.Tensor  # [b] float32; below 1e-5 means greedy
    top_p: torch.Tensor  # [b] float32
    top_k: torch.Tensor  # [b] int64, 0: no cut
    seeds: torch.Tensor  # [b] int64
    steps: torch.Tensor  # [b] int64 tokens generated so far
    any_random: bool  # static: whether any row samples


def sample(logits: torch.Tensor, p: SamplingBatch) -> torch.Tensor:
    """logits [b, vocab] float32 -> token ids [b] (on the device)."""
    greedy = logits.argmax(dim=-1)
    if not p.any_random:
        return greedy
    temperature = p.temperature.clamp_min(1e-5).unsqueeze(1)
    # Shift before dividing: with a tiny temperature the best logit stays 0 instead of becoming inf - inf.
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    cut_k = (p.top_k.unsqueeze(1) > 0) & (rank >= p.top_k.unsqueeze(1))
    ordered = ordered.masked_fill(cut_k, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p; the first token always stays (also when top_p
    # underflows float32).
    cut_p = (probs.cumsum(dim=-1) - probs >= p.top_p.unsqueeze(1)) & (rank > 0)
    ordered = ordered.masked_fill(cut_p, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform(p.seeds, p.steps, logits.shape[1])))
    choice = order.gather(1, (ordered + gumbel.gather(1, order)).argmax(dim=-1, keepdim=True)).squeeze(1)
    return torch.where(p.temperature < 1e-5, greedy, choice)
