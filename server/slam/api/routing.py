"""What the engine loop does with one step's outputs: route each token to its stream, buffer it for resumed
streams, checkpoint it, and keep the metrics that need the step's view.

`EngineLoop` (loop.py) owns the thread, admission and the request bookkeeping; this mixin runs on that thread
and uses its state (`_streams`, `_detached`, `_lock`, `_aborted`, `_fail`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from slam.api.events import Stream, TokenEvent

if TYPE_CHECKING:
    from slam.api.metrics import Metrics
    from slam.api.streams import StreamBuffers
    from slam.checkpoint import Checkpointer
    from slam.engine.engine import LLMEngine
    from slam.engine.sequence import Sequence

log = logging.getLogger("slam.api")


class StepRouting:
    engine: LLMEngine
    metrics: Metrics
    buffers: StreamBuffers
    checkpointer: Checkpointer | None
    on_first_output: list
    _streams: dict[str, Stream]
    _detached: dict[str, tuple[Sequence, float]]
    _aborted: list[str]

    def _fail(self, seq: Sequence, message: str) -> None:
        raise NotImplementedError

    def _step(self, step: Callable[[], list] | None = None) -> None:
        """Run `step` (default: an engine step) and route its outputs."""
        stats = self.engine.stats
        replaced_before, ahead_before = stats.replacements, stats.steps_ahead
        outputs = (step or self.engine.step)()
        self.metrics.steps.inc()
        self.metrics.steps_ahead.inc(stats.steps_ahead - ahead_before)
        self.metrics.replacements.inc(stats.replacements - replaced_before)
        now = time.monotonic()
        generated = 0
        with self._lock:
            for out in outputs:
                try:
                    generated += self._route(out, now)
                except Exception as exc:  # this request's output could not be handled: it alone fails
                    log.exception("request %s failed while routing its output", out.seq.request_id)
                    self._fail(out.seq, f"server error: {type(exc).__name__}: {exc}")
        self.metrics.generation_tokens.inc(generated)
        self._record(outputs, now)
        self.metrics.cache_gauges(list(self.engine.scheduler.running))

    def _route(self, out, now: float) -> int:
        rid = out.seq.request_id
        stream = self._streams.get(rid)
        if out.error:
            self.metrics.failed.inc()
            self._detached.pop(rid, None)
            if stream is not None:
                del self._streams[rid]
                self._deliver(stream, TokenEvent(len(out.seq.output_ids), -1, "", True, None, 0, 0,
                                                 error=out.error, choice=stream.choice))
            return 0
        if out.finished:
            self._detached.pop(rid, None)
        if stream is None:
            return 1  # detached, or released by its handler (aborted, reaped at the next step)
        stream.last_token = self.metrics.token_timing(stream.arrival, stream.last_token, now)
        event = TokenEvent(len(out.seq.output_ids) - 1, out.token_id, out.text, out.finished,
                           out.seq.finish_reason if out.finished else None, out.cache_tokens, out.cache_bytes,
                           choice=stream.choice, logprob=out.logprob, top_logprobs=out.top_logprobs)
        if out.finished:
            del self._streams[rid]
            self.metrics.success.labels(out.seq.finish_reason or "stop").inc()
            self.metrics.e2e.observe(now - stream.arrival)
        self._deliver(stream, event)
        return 1

    def _record(self, outputs: list, now: float) -> None:
        """Buffer every token for resumable streams, then checkpoint (snapshots happen here, at the step
        boundary; uploads run on the checkpointer's thread). A failure fails only its request."""
        for out in outputs:
            seq = out.seq
            try:
                if out.error:
                    self.buffers.finish(seq.request_id, "failed", "error")
                    continue
                for cb in list(self.on_first_output):
                    cb(seq.request_id, now)
                self.buffers.append(seq.request_id, len(seq.output_ids) - 1, out.token_id, out.text,
                                    seq.finish_reason if out.finished else None)
                if self.checkpointer is not None and not seq.aborted:
                    self.checkpointer.after_step([seq])
            except Exception as exc:
                log.exception("request %s failed after its step", seq.request_id)
                with self._lock:
                    self._fail(seq, f"server error: {type(exc).__name__}: {exc}")
        self._delete_aborted()

    def _delete_aborted(self) -> None:
        with self._lock:
            gone, self._aborted = self._aborted, []
        if self.checkpointer is not None:
            for rid in gone:
                self.checkpointer.delete_request(rid)

    @staticmethod
    def _deliver(stream: Stream, event: TokenEvent) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass
