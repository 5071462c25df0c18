"""Async scheduling: a decode step launched before the previous one is postprocessed, so that the host's work
(the next plan, detokenizing, stop checks, routing) overlaps the device's.

A step runs ahead only over decode steps of running requests that need none of their tokens on the host to
sample. Its input tokens are read on the device, where the step in flight sampled them (the plan's `prev`).
A request that the token in flight ends by length, or that must be at rest after it (the engine's barrier:
a checkpoint is due), sits out the step launched meanwhile. A request that stops on a token while its next
step is in flight has that step's token dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from slam.engine.output import EngineStats, StepOutput
from slam.engine.plan import sampling_batch
from slam.engine.sampler import sample
from slam.engine.sequence import Sequence

if TYPE_CHECKING:
    from slam.engine.model_runner import ModelRunner
    from slam.engine.scheduler import Scheduler

log = logging.getLogger("slam.engine")

@dataclass
class InFlight:
    """A decode step launched ahead of its postprocessing (async scheduling): what the host reads back."""

    rows: list[Sequence]
    host: torch.Tensor  # [2 * rows + 1] int64 (pinned on GPUs): sampled ids, NaN flags, the churn counter
    done: torch.cuda.Event | None  # recorded after the copy to `host` (None on CPUs, where it is done)
    cache_tokens: list[int]  # each row's active cache after this step


class StepsAhead:
    """LLMEngine's steps that run ahead (a mixin: it uses the engine's scheduler, runner and step helpers)."""

    in_flight: InFlight | None
    scheduler: Scheduler
    runner: ModelRunner
    stats: EngineStats
    barrier: Callable[[Sequence], bool] | None

    def runs_ahead(self) -> bool:
        """Whether the next step may launch while one is in flight: a decode step of the running requests
        only (no admission, no prefill), none of which needs its tokens on the host to sample."""
        s = self.scheduler
        if s.waiting and len(s.running) < s.max_batch:
            return False
        return all(seq.prefilled and not seq.needs_host for seq in s.running)

    def sits_out(self, seq: Sequence) -> bool:
        """A request whose token in flight ends it by length, or after which it must be at rest (barrier),
        skips the step launched now; its slot stays as that token left it."""
        if not seq.in_flight:
            return False
        ends = len(seq.output_ids) + seq.in_flight >= seq.sampling.max_tokens
        return ends or bool(self.barrier and self.barrier(seq))

    def step_ahead(self, decoding: list[Sequence]) -> list[StepOutput]:
        """Launch a decode step of `decoding`, then postprocess the step in flight while the device runs it."""
        try:
            launched = self.launch(decoding)
        except Exception as exc:
            log.exception("engine step failed")
            outputs = self.settle()
            return outputs + self.fail([(seq, None) for seq in decoding], f"engine error: {type(exc).__name__}: {exc}")
        self.stats.steps += 1
        self.stats.steps_ahead += 1
        outputs = self.settle()
        self.in_flight = launched
        return outputs

    def launch(self, decoding: list[Sequence]) -> InFlight:
        decoding.sort(key=lambda s: s.slot)
        logits = self.decode(decoding)
        tokens = sample(logits, sampling_batch(decoding, logits.device))
        self.runner.sampled[: len(decoding)].copy_(tokens)
        for i, seq in enumerate(decoding):
            seq.in_flight += 1
            seq.prev_row = i
        results, done = self.step_results(tokens, logits), None
        if results.device.type == "cuda":  # back in pinned memory without waiting; read once `done` passed
            results = torch.empty(results.shape, dtype=results.dtype, pin_memory=True).copy_(results, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return InFlight(decoding, results, done, [seq.cache_tokens() for seq in decoding])

    def settle(self) -> list[StepOutput]:
        """Postprocess the step in flight, if any (waits for its sampled ids)."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return []
        if flight.done is not None:
            flight.done.synchronize()
        for seq in flight.rows:
            seq.in_flight -= 1
        return self.emit(flight.rows, flight.host.tolist(), None, flight.cache_tokens)
