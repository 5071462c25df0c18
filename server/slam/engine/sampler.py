"""Batched token selection on the device: greedy, or temperature with top-k and top-p, per request; before
it, per-request penalties and min_tokens masking (SamplingParams has the semantics); and the
log-probabilities reported to clients.

Randomness is counter-based: the noise for request r at generation step s is a hash of (seed_r, s, token
id), turned into Gumbel noise, so `argmax(logits / T + noise)` samples softmax(logits / T). A request's
draws depend only on its seed and how many tokens it has generated: batching, restore on another replica
or another device give the same tokens, and the checkpoint needs only the seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from slam.engine.sequence import SamplingParams

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


def sample(logits: torch.Tensor, p: SamplingBatch | None) -> torch.Tensor:
    """logits [b, vocab] float32 -> token ids [b] (on the device); every row greedy when p is None."""
    greedy = logits.argmax(dim=-1)
    if p is None:
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


def process(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
            eos_ids: Iterable[int]) -> torch.Tensor:
    """One request's logits [vocab] to choose from (a new tensor when anything changes; `logits` stays raw)."""
    if params.penalized:
        logits = penalize(logits, params, prompt_ids, output_ids)
    if len(output_ids) < params.min_tokens:
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        stops = [t for t in stops if t < logits.numel()]
        if stops:
            logits = logits.clone()
            logits[stops] = float("-inf")
    return logits


def penalize(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
             output_ids: list[int]) -> torch.Tensor:
    logits = logits.float().clone()
    vocab = logits.numel()
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        seen[torch.tensor(prompt_ids + output_ids, dtype=torch.long, device=logits.device)] = True
        p = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if output_ids and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab]
        counts = counts.to(device=logits.device, dtype=logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` and the `top` most likely (token, log-probability), best first, under the
    distribution of the raw logits [vocab]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, min(top, logp.numel())) if top else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
    return float(logp[token]), pairs
