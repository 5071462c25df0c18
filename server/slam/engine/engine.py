"""The engine: one short step (schedule, run, postprocess) over the running requests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from slam.config import CacheConfig, EngineConfig
from slam.engine.model_runner import ModelRunner
from slam.engine.sampler import process, sample, token_logprobs
from slam.engine.scheduler import Scheduler
from slam.engine.sequence import SamplingParams, Sequence, Status
from slam.model import LoadedModel, load_model


log = logging.getLogger("slam.engine")


class RequestError(ValueError):
    """A request the engine cannot take; the message says why."""


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


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.loaded = loaded or load_model(config.model, config.dtype, config.device)
        self.tokenizer = self.loaded.tokenizer
        self.eos_ids = self.loaded.eos_token_ids
        self.runner = ModelRunner(self.loaded)
        self.scheduler = Scheduler(config.max_batch, config.prefill_chunk)
        self.stats = EngineStats()
        self.lock = threading.Lock()  # guards the scheduler's queues between the step and other threads

    # --- requests ------------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams | None = None,
        cache: CacheConfig | None = None,
        request_id: str | None = None,
    ) -> Sequence:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.runner.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError(f"token ids must lie in [0, {vocab}); got {min(prompt_ids)}..{max(prompt_ids)}")
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; the maximum is {self.config.max_prompt_tokens}"
            )
        extra = {} if request_id is None else {"request_id": request_id}
        seq = Sequence(list(prompt_ids), sampling or SamplingParams(), cache or self.config.cache, **extra)
        with self.lock:
            self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        seq.aborted = True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    # --- the step ------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        with self.lock:
            self.scheduler.reap_aborted()
            batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            logits = self.runner.run(batch)
        except Exception as exc:  # A failing step fails its own requests, never the engine.
            log.exception("engine step failed")
            return self.fail(batch, f"engine error: {type(exc).__name__}: {exc}")
        self.stats.steps += 1
        self.stats.replacements = self.runner.replacements
        return self.postprocess(batch, logits)

    def fail(self, batch, message: str) -> list[StepOutput]:
        outputs = []
        with self.lock:
            for seq, _ in batch:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
                outputs.append(StepOutput(seq, -1, "", True, error=message))
        return outputs

    def postprocess(self, batch, logits) -> list[StepOutput]:
        outputs = []
        for row, (seq, chunk) in enumerate(batch):
            self.stats.prompt_tokens += max(0, min(seq.num_cached + len(chunk), len(seq.prompt_ids)) - seq.num_cached)
            seq.num_cached += len(chunk)
            if seq.num_cached < seq.length:
                continue  # a prefill chunk that did not reach the end of the prompt
            try:
                outputs.append(self.next_token(seq, logits[row]))
            except Exception as exc:  # sampling or detokenizing one request fails that request only
                log.exception("request %s failed in postprocess", seq.request_id)
                outputs.extend(self.fail([(seq, chunk)], f"engine error: {type(exc).__name__}: {exc}"))
        return outputs

    def next_token(self, seq: Sequence, logits) -> StepOutput:
        cache_tokens, cache_bytes = seq.cache_tokens(), seq.cache_bytes()
        params = seq.sampling
        token = sample(process(logits, params, seq.prompt_ids, seq.output_ids, self.eos_ids), params, seq.generator)
        logprob, top = token_logprobs(logits, token, params.logprobs) if params.logprobs is not None else (None, None)
        seq.output_ids.append(token)
        self.stats.generation_tokens += 1
        before = seq.output_text
        self.detokenize(seq)
        reason = self.stop_reason(seq, token, before)
        text = self.visible_delta(seq, before, reason is not None)
        if reason:
            seq.finish_reason = reason
            with self.lock:
                self.scheduler.finish(seq)
        return StepOutput(seq, token, text, reason is not None, cache_tokens, cache_bytes, logprob=logprob,
                          top_logprobs=top)

    def detokenize(self, seq: Sequence) -> str:
        ids = seq.all_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            seq.output_text += delta
            return delta
        return ""

    def stop_reason(self, seq: Sequence, token: int, before: str) -> str | None:
        """Why `seq` ends with `token` (None: it goes on). `before` is its text before this token's.

        As in vLLM: no stop condition applies before `min_tokens`; a stop token's own text is dropped; a
        stop string ends the text right before it, searched only where this token's text could complete it."""
        params = seq.sampling
        if len(seq.output_ids) >= params.min_tokens:
            if token in params.stop_token_ids:
                seq.output_text = before
                return "stop"
            if token in self.eos_ids and not params.ignore_eos:
                return "stop"
            text = seq.output_text
            found = [i for s in params.stop if (i := text.find(s, max(0, len(before) - len(s) + 1))) >= 0]
            if found:
                seq.output_text = text[: min(found)]
                return "stop"
        if len(seq.output_ids) >= params.max_tokens:
            return "length"
        return None

    @staticmethod
    def held_back(text: str, stops: list[str]) -> int:
        """Length of the longest end of `text` that could be the start of a stop string."""
        held = 0
        for stop in stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def visible_delta(self, seq: Sequence, before: str, finished: bool) -> str:
        """The text a client may see now: never text a later stop string could cut. What was held back
        earlier is released once it can no longer start a stop string, or when the request ends."""
        stops = seq.sampling.stop
        start = len(before) - self.held_back(before, stops)
        end = len(seq.output_text) if finished else len(seq.output_text) - self.held_back(seq.output_text, stops)
        return seq.output_text[start:end]

    # --- convenience ---------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Iterable[list[int]],
        sampling: SamplingParams | None = None,
        cache: CacheConfig | None = None,
        on_output: Callable[[StepOutput], None] | None = None,
    ) -> list[Sequence]:
        """Run the given prompts to completion as one continuously batched workload."""
        seqs = [self.add_request(p, sampling, cache) for p in prompts]
        while any(s.status is not Status.FINISHED for s in seqs):
            for out in self.step():
                if on_output:
                    on_output(out)
        return seqs
