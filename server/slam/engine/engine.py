"""The engine: one short step (schedule, run, postprocess) over the running requests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import torch

from slam.cache import POLICIES
from slam.config import CacheConfig, EngineConfig, candidate_floor, oversample_for
from slam.engine.ahead import InFlight, StepsAhead
from slam.engine.model_runner import ModelRunner
from slam.engine.output import EngineStats, StepOutput, detokenize, stop_reason, visible_delta
from slam.engine.plan import decode_plan, sampling_batch
from slam.engine.sampler import process, sample, token_logprobs
from slam.engine.scheduler import Scheduler
from slam.engine.sequence import SamplingParams, Sequence, Status
from slam.model import LoadedModel, load_model, resolve_dtype, resolve_reserve_dtype


log = logging.getLogger("slam.engine")


class RequestError(ValueError):
    """A request the engine cannot take; the message says why."""


class LLMEngine(StepsAhead):
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.loaded = loaded or load_model(config.model, config.dtype, config.device)
        self.tokenizer = self.loaded.tokenizer
        self.eos_ids = self.loaded.eos_token_ids
        model_config = self.loaded.model.config
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        # The pool's columns per slot: the largest budget a request may use (`full` needs its whole length).
        self.budget = config.max_budget or (config.cache.budget if config.cache.bounded else self.max_model_len)
        self.runner = ModelRunner(
            self.loaded, config.max_batch, self.budget, reserve_device=self._reserve_device(),
            reserve_int8=resolve_reserve_dtype(config.reserve_dtype, self.loaded.device, self.max_model_len) == "int8", cache_positions=config.cache.position_mode == "cache",
            int8_weights=resolve_dtype(config.dtype, self.loaded.device) == "int8", enforce_eager=config.enforce_eager, select_every=config.select_every, compile=config.compile,
            selection=(config.select_chunk,
                       oversample_for(config.select_every, config.select_oversample, self._middle()),
                       config.select_min_ratio, candidate_floor(config.select_every, config.select_oversample)),
            max_reserve=self.max_model_len)
        self.async_scheduling = self._async_scheduling()
        self.in_flight: InFlight | None = None
        # Requests that must be at rest (host and device agreeing) after their next token: the checkpointer's
        # due ones. Under async scheduling they sit out the step launched while that token is in flight.
        self.barrier: Callable[[Sequence], bool] | None = None
        self.scheduler = Scheduler(config.max_batch, config.prefill_chunk)
        self.slots: list[Sequence] = []  # slots[i] runs in pool slot i; running requests fill [0, n)
        self.stats = EngineStats()
        self.replaced_done = 0  # churn of requests that left their slots
        self.lock = threading.Lock()  # guards the scheduler's queues between the step and other threads

    def _middle(self) -> int:
        # slam's critical columns in the pool's widest slot, which size two-stage selection's candidates.
        cache = self.config.cache
        return POLICIES["slam"](budget=self.budget, sink=cache.sink, recent=cache.recent).middle

    def _async_scheduling(self) -> bool:
        # Worth it where the device runs a step while the host prepares the next: with CUDA graphs. A GPU's
        # host reserve keeps its steps in order: the host reallocates its pinned buffers, which the device may
        # still be writing through their aliases, and the GPU checks do not cover that case.
        pool, setting = self.runner.pool, self.config.async_scheduling
        host_reserve = pool.device.type == "cuda" and pool.reserve_memory.type == "cpu"
        if setting == "on" and host_reserve:
            log.warning("async scheduling is off: the reserve lives in host memory")
        return setting != "off" and not host_reserve and (setting == "on" or self.runner.use_graphs)

    def _reserve_device(self) -> str:
        # Measured (docs/benchmarks.md): on a GPU the device reserve wins as long as it fits.
        return "auto" if self.config.reserve_device == "auto" else self.config.reserve_device

    # --- requests ------------------------------------------------------------------------------------
    def make_sequence(self, prompt_ids: list[int], sampling: SamplingParams | None = None,
                      cache: CacheConfig | None = None, request_id: str | None = None,
                      prefill_boundaries: list[int] | None = None) -> Sequence:
        """A checked request, not yet queued (restores build theirs the same way)."""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.runner.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError(f"token ids must lie in [0, {vocab}); got {min(prompt_ids)}..{max(prompt_ids)}")
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; the maximum is {self.config.max_prompt_tokens}"
            )
        cache = cache or self.config.cache
        if cache.position_mode != self.config.cache.position_mode:
            raise RequestError(f"position_mode is {self.config.cache.position_mode!r} on this server")
        if cache.bounded and cache.budget > self.budget:
            raise RequestError(f"budget {cache.budget} exceeds this server's maximum of {self.budget}")
        sampling = sampling or SamplingParams()
        if not cache.bounded and len(prompt_ids) + sampling.max_tokens > self.budget:
            raise RequestError(f"the full cache holds {self.budget} tokens; prompt ({len(prompt_ids)}) + "
                               f"max_tokens ({sampling.max_tokens}) exceed it")
        extra = {} if request_id is None else {"request_id": request_id}
        return Sequence(list(prompt_ids), sampling, cache, pool_budget=self.budget,
                        prefill_boundaries=sorted(prefill_boundaries or []), **extra)

    def add_request(self, prompt_ids: list[int], sampling: SamplingParams | None = None,
                    cache: CacheConfig | None = None, request_id: str | None = None,
                    prefill_boundaries: list[int] | None = None) -> Sequence:
        """Queue a request. `prefill_boundaries`: prompt positions no prefill chunk may cross."""
        seq = self.make_sequence(prompt_ids, sampling, cache, request_id, prefill_boundaries)
        with self.lock:
            self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        seq.aborted = True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    # --- slots ---------------------------------------------------------------------------------------
    def take_slot(self, seq: Sequence) -> int:
        seq.slot = len(self.slots)
        self.slots.append(seq)
        pool = seq.pool = self.runner.pool
        pool.clear(seq.slot)
        seq.token_bytes = 2 * pool.layers * pool.kv_heads * pool.head_dim * pool.k[0].element_size()
        if seq.policy.uses_reserve:  # sized once for what the request's known tokens will evict
            pool.ensure_reserve(seq.policy.reserve_rows(seq.length))
        return seq.slot

    def release_slot(self, seq: Sequence) -> None:
        """Free a leaving request's slot; the last running slot moves into it so [0, n) stays compact."""
        if seq.slot is None:
            return
        seq.replacements = self.replacements_of(seq)
        self.replaced_done += seq.replacements
        last = self.slots.pop()
        if last is not seq:
            self.runner.pool.move(last.slot, seq.slot)
            self.slots[seq.slot] = last
            last.slot = seq.slot
        else:
            self.runner.pool.clear(seq.slot)
        seq.slot = None

    def replacements_of(self, seq: Sequence) -> int:
        """Critical tokens swapped in for this request so far (reads the device: not for every step)."""
        if seq.slot is None:
            return seq.replacements
        return seq.replacements + int(self.runner.pool.replaced[seq.slot])

    # --- the step ------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One step's outputs. Under async scheduling a decode step is launched before the previous one is
        postprocessed, so the host's work overlaps the device's: the call returns the previous step's
        outputs (none when nothing was in flight)."""
        with self.lock:
            for seq in self.scheduler.reap_aborted():
                self.release_slot(seq)
            ahead = self.in_flight is not None
            batch = self.scheduler.schedule()
            if ahead:
                batch = [(seq, chunk) for seq, chunk in batch if not self.sits_out(seq)]
        runs_ahead = self.async_scheduling and not any(seq.needs_host for seq, _ in batch)
        if ahead and not (batch and runs_ahead):
            # The batch waits for the step in flight: the next call schedules it again from the settled state
            # (scheduling only admits requests and reads where each stands).
            return self.settle()
        if not batch:
            return []
        if runs_ahead:
            return self.step_ahead(batch)
        try:
            rows, logits = self.runner_step(batch)
        except Exception as exc:  # A failing step fails its own requests, never the engine.
            log.exception("engine step failed")
            return self.fail(batch, f"engine error: {type(exc).__name__}: {exc}")
        self.stats.steps += 1
        return self.postprocess(batch, rows, logits)

    def step_results(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """What the host reads of a step, in one tensor on the device: sampled ids, which rows had NaN logits,
        the churn counter."""
        nan = torch.isnan(logits).any(dim=-1).long()
        return torch.cat([tokens, nan, self.runner.pool.replaced[: len(self.slots)].sum().view(1)])

    def runner_step(self, batch) -> tuple[list[Sequence], torch.Tensor | None]:
        """Prefill chunks, then one decode step; returns the requests that sample and their logits."""
        rows, row_logits = [], []
        decoding = []
        for seq, chunk in batch:
            if seq.slot is None:
                self.take_slot(seq)
            if seq.prefilled:
                decoding.append(seq)
                continue
            logits = self.runner.prefill(seq.slot, seq.policy, chunk, seq.num_cached)
            self.stats.prompt_tokens += max(0, min(seq.num_cached + len(chunk), len(seq.prompt_ids)) - seq.num_cached)
            seq.num_cached += len(chunk)
            if seq.num_cached == seq.length:
                rows.append(seq)
                row_logits.append(logits)
        if decoding:
            decoding.sort(key=lambda s: s.slot)
            rows.extend(decoding)
            row_logits.append(self.decode(decoding))
        if not rows:
            return [], None
        if len(row_logits) == 1:
            return rows, row_logits[0].view(-1, row_logits[0].shape[-1])
        return rows, torch.cat([x.view(-1, x.shape[-1]) for x in row_logits])

    def decode(self, decoding: list[Sequence]) -> torch.Tensor:
        """One decode step of `decoding` (sorted by slot); their logits [len(decoding), vocab]."""
        logits = self.runner.decode(*decode_plan(self.runner, len(self.slots), decoding))
        for seq in decoding:
            seq.num_cached += 1
        slots = [s.slot for s in decoding]
        # A slice when the slots run in order (the usual case): indexing by a list copies it to the device and
        # waits for the step to finish.
        return logits[: len(slots)] if slots == list(range(len(slots))) else logits[slots]

    def fail(self, batch, message: str) -> list[StepOutput]:
        outputs = []
        with self.lock:
            for seq, _ in batch:
                if seq.finished:  # ended while its step was in flight
                    continue
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
                self.release_slot(seq)
                outputs.append(StepOutput(seq, -1, "", True, error=message))
        return outputs

    def postprocess(self, batch, rows: list[Sequence], logits: torch.Tensor | None) -> list[StepOutput]:
        if not rows:
            return []
        tokens = sample(self.processed(rows, logits), sampling_batch(rows, logits.device))
        # The step's one transfer to the host.
        return self.emit(rows, self.step_results(tokens, logits).tolist(), logits)

    def emit(self, rows: list[Sequence], host: list[int], logits: torch.Tensor | None) -> list[StepOutput]:
        """Each row's token to its request: `host` holds the sampled ids, NaN flags and churn counter
        (step_results); `logits` the raw rows for logprobs (None: no row asked for them)."""
        # Never lower: under async scheduling a leaving request's churn can be counted both ways for a step.
        self.stats.replacements = max(self.stats.replacements, self.replaced_done + host[-1])
        n = len(rows)
        outputs = []
        for i, (seq, token) in enumerate(zip(rows, host[:n])):
            if seq.finished:  # it ended (or was aborted) while this step was in flight: the token is dropped
                continue
            try:  # sampling or detokenizing one request fails that request only
                if host[n + i]:
                    raise FloatingPointError("the model produced NaN logits")
                outputs.append(self.next_token(seq, token, None if logits is None else logits[i]))
            except Exception as exc:
                log.exception("request %s failed in postprocess", seq.request_id)
                outputs.extend(self.fail([(seq, None)], f"engine error: {type(exc).__name__}: {exc}"))
        return outputs

    def processed(self, rows: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Logits after each request's penalties and min_tokens mask (rows that have none stay as they are)."""
        need = [i for i, s in enumerate(rows) if s.sampling.penalized or len(s.output_ids) < s.sampling.min_tokens]
        if not need:
            return logits
        logits = logits.clone()
        for i in need:
            s = rows[i]
            logits[i] = process(logits[i], s.sampling, s.prompt_ids, s.output_ids, self.eos_ids)
        return logits

    def next_token(self, seq: Sequence, token: int, raw: torch.Tensor | None) -> StepOutput:
        if seq.forced_ids is not None:  # teacher forcing (perplexity): the text decides, not the sampler
            token = seq.forced_ids[len(seq.output_ids)]
        # The cache after this token's step: a later step already in flight (async scheduling) does not count.
        cache_tokens = seq.cache_tokens(seq.num_cached - seq.in_flight)
        cache_bytes = cache_tokens * seq.token_bytes
        params = seq.sampling
        logprob, top = token_logprobs(raw, token, params.logprobs) if params.logprobs is not None else (None, None)
        seq.output_ids.append(token)
        self.stats.generation_tokens += 1
        before = seq.output_text
        self.detokenize(seq)
        reason = stop_reason(seq, token, before, self.eos_ids)
        text = visible_delta(seq, before, reason is not None)
        if reason:
            seq.finish_reason = reason
            with self.lock:
                self.scheduler.finish(seq)
                self.release_slot(seq)
        return StepOutput(seq, token, text, reason is not None, cache_tokens, cache_bytes, logprob=logprob,
                          top_logprobs=top)

    def detokenize(self, seq: Sequence) -> str:
        return detokenize(self.tokenizer, seq)

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
