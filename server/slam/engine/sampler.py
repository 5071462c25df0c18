"""Token selection: penalties and min_tokens masking, then greedy, or temperature with top-k and top-p from
each request's own generator; and the log-probabilities reported to clients. Semantics: SamplingParams."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from slam.engine.sequence import SamplingParams


def process(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
            eos_ids: Iterable[int]) -> torch.Tensor:
    """The logits the token is chosen from (a new tensor when anything changes; `logits` stays raw)."""
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


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` and the `top` most likely (token, log-probability), best first, under the
    distribution of the raw logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, min(top, logp.numel())) if top else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
    return float(logp[token]), pairs
