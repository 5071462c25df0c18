"""What a step gives each request (StepOutput) and the engine's counters; a request's text as tokens arrive:
incremental detokenization, stop conditions, and the part of the text a client may see while a stop string
could still cut it."""

from __future__ import annotations

from dataclasses import dataclass

from slam.engine.sequence import Sequence


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int  # -1 when the step failed
    text: str  # newly decoded text, possibly empty while a multi-byte character is incomplete
    finished: bool
    cache_tokens: int = 0  # the request's active cache per layer and KV head after this step
    cache_bytes: int = 0  # measured before a finished request's cache is freed
    error: str | None = None
    logprob: float | None = None  # of the chosen token, when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    replacements: int = 0
    steps: int = 0
    steps_ahead: int = 0  # decode steps launched before the previous one was postprocessed (async scheduling)


def detokenize(tokenizer, seq: Sequence) -> str:
    """Append the text of `seq`'s newest tokens to its output; returns the new text."""
    if tokenizer is None:  # random-weight benchmark models have ids, not text
        return ""
    tail = seq.ids(seq.prefix_offset)  # only the last few tokens: never the whole context
    prefix = tokenizer.decode(tail[: seq.read_offset - seq.prefix_offset], skip_special_tokens=True)
    full = tokenizer.decode(tail, skip_special_tokens=True)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        delta = full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, seq.length
        seq.output_text += delta
        return delta
    return ""


def stop_reason(seq: Sequence, token: int, before: str, eos_ids) -> str | None:
    """Why `seq` ends with `token` (None: it goes on). `before` is its text before this token's.

    As in vLLM: no stop condition applies before `min_tokens`; a stop token's own text is dropped; a
    stop string ends the text right before it, searched only where this token's text could complete it."""
    params = seq.sampling
    if len(seq.output_ids) >= params.min_tokens:
        if token in params.stop_token_ids:
            seq.output_text = before
            return "stop"
        if token in eos_ids and not params.ignore_eos:
            return "stop"
        text = seq.output_text
        found = [i for s in params.stop if (i := text.find(s, max(0, len(before) - len(s) + 1))) >= 0]
        if found:
            seq.output_text = text[: min(found)]
            return "stop"
    if len(seq.output_ids) >= params.max_tokens:
        return "length"
    return None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def visible_delta(seq: Sequence, before: str, finished: bool) -> str:
    """The text a client may see now: never text a later stop string could cut. What was held back
    earlier is released once it can no longer start a stop string, or when the request ends."""
    stops = seq.sampling.stop
    start = len(before) - held_back(before, stops)
    end = len(seq.output_text) if finished else len(seq.output_text) - held_back(seq.output_text, stops)
    return seq.output_text[start:end]
