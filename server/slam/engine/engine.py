"""The engine: one short step (schedule, run, postprocess) over the running requests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from slam.config import CacheConfig, EngineConfig
from slam.engine.model_runner import ModelRunner
from slam.engine.sampler import sample
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
            cache_tokens, cache_bytes = seq.cache_tokens(), seq.cache_bytes()
            token = sample(logits[row], seq.sampling, seq.generator)
            seq.output_ids.append(token)
            self.stats.generation_tokens += 1
            text = self.detokenize(seq)
            reason = self.stop_reason(seq, token)
            if reason == "stop" and seq.sampling.stop:
                text = self.cut_at_stop(seq, text)
            if reason:
                seq.finish_reason = reason
                with self.lock:
                    self.scheduler.finish(seq)
            outputs.append(StepOutput(seq, token, text, reason is not None, cache_tokens, cache_bytes))
        return outputs

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

    def stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in self.eos_ids and not seq.sampling.ignore_eos:
            return "stop"
        if any(s in seq.output_text for s in seq.sampling.stop):
            return "stop"
        if len(seq.output_ids) >= seq.sampling.max_tokens:
            return "length"
        return None

    @staticmethod
    def cut_at_stop(seq: Sequence, delta: str) -> str:
        cut = min((seq.output_text.find(s) for s in seq.sampling.stop if s in seq.output_text), default=-1)
        if cut < 0:
            return delta
        before = len(seq.output_text) - len(delta)
        seq.output_text = seq.output_text[:cut]
        return delta[: max(cut - before, 0)]

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
