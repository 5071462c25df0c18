"""Async scheduling: a decode step launched before the previous one is postprocessed, so that the host's work
(the next plan, detokenizing, stop checks, routing) overlaps the device's.

A step runs ahead unless one of its requests needs its tokens on the host to sample (penalties, the min_tokens
mask, logprobs, teacher forcing); prefill chunks run ahead too, as prompts are on the host. A decode step's
input tokens are read on the device, where the step in flight sampled them (the plan's `prev`).
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


class StepsAhead:
    """LLMEngine's steps that run ahead (a mixin: it uses the engine's scheduler, runner and step helpers)."""

    in_flight: InFlight | None
    scheduler: Scheduler
    runner: ModelRunner
    stats: EngineStats
    barrier: Callable[[Sequence], bool] | None

    def sits_out(self, seq: Sequence) -> bool:
        """A request whose token in flight ends it by length, or after which it must be at rest (barrier),
        skips the step launched now; its slot stays as that token left it."""
        if not seq.in_flight:
            return False
        ends = len(seq.output_ids) + seq.in_flight >= seq.sampling.max_tokens
        return ends or bool(self.barrier and self.barrier(seq))

    def step_ahead(self, batch: list[tuple[Sequence, list[int]]]) -> list[StepOutput]:
        """Launch a step of `batch` (prefill chunks and a decode step), then postprocess the step in flight while
        the device runs it."""
        try:
            launched = self.launch(batch)
        except Exception as exc:
            log.exception("engine step failed")
            outputs = self.settle()
            return outputs + self.fail(batch, f"engine error: {type(exc).__name__}: {exc}")
        self.stats.steps += 1
        self.stats.steps_ahead += launched is not None
        outputs = self.settle()
        self.in_flight = launched
        return outputs

    def launch(self, batch: list[tuple[Sequence, list[int]]]) -> InFlight | None:
        """Run `batch` and sample without waiting; None when no row samples (prefill chunks that do not end a
        prompt)."""
        rows, logits = self.runner_step(batch)
        if not rows:
            return None
        tokens = sample(logits, sampling_batch(rows, logits.device))
        self.runner.sampled[: len(rows)].copy_(tokens)
        for i, seq in enumerate(rows):
            seq.in_flight += 1
            seq.prev_row = i
        results, done = self.step_results(tokens, logits), None
        if results.device.type == "cuda":  # back in pinned memory without waiting; read once `done` passed
            results = torch.empty(results.shape, dtype=results.dtype, pin_memory=True).copy_(results, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return InFlight(rows, results, done)

    def settle(self) -> list[StepOutput]:
        """Postprocess the step in flight, if any (waits for its sampled ids)."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return []
        if flight.done is not None:
            flight.done.synchronize()
        for seq in flight.rows:
            seq.in_flight -= 1
        return self.emit(flight.rows, flight.host.tolist(), None)
