"""Token selection: greedy, or temperature with top-k and top-p, from each request's own generator."""

from __future__ import annotations

import torch

from slam.engine.sequence import SamplingParams


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    # logits: [vocab]
    if params.greedy:
        return int(logits.argmax())
    # Sampling runs on the CPU with the request's own generator, so a restored request draws the same
    # numbers on any device.
    logits = logits.float().cpu()
    # Shift before dividing: with a tiny temperature the best logit stays 0 instead of becoming inf - inf.
    logits = (logits - logits.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        drop[0] = False  # also when top_p underflows float32
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
