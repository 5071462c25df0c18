"""The engine loop: one background thread steps the engine while there is work; asyncio handlers get
their tokens through per-request queues.

Continuous batching comes from the engine's scheduler: requests join and leave between steps. This thread
only routes each step's outputs to the request that owns them, via `loop.call_soon_threadsafe`, and keeps
the metrics that need the step's view (cache sizes, token timings).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slam.api.metrics import Metrics
from slam.api.streams import StreamBuffers
from slam.config import CacheConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams, Sequence

if TYPE_CHECKING:
    from slam.checkpoint import Checkpointer

log = logging.getLogger("slam.api")


class QueueFull(Exception):
    """More requests in flight than max_batch + max_queue."""


@dataclass
class TokenEvent:
    index: int  # 0-based index of this token among the generated ones (the SSE id)
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None
    cache_tokens: int  # the request's active cache, per layer and KV head, after this step
    cache_bytes: int
    error: str | None = None


@dataclass(eq=False)
class Stream:
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    last_token: float | None = None
    last: TokenEvent | None = None

    async def next_event(self) -> TokenEvent:
        event: TokenEvent = await self.queue.get()
        self.last = event
        return event

    async def events(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self.next_event()
            yield event
            if event.finished or event.error:
                return


class Draining(Exception):
    """The server is shutting down: it admits nothing new."""


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: Metrics, max_queue: int,
                 checkpointer: Checkpointer | None = None, buffers: StreamBuffers | None = None):
        self.engine = engine
        self.metrics = metrics
        self.capacity = engine.config.max_batch + max_queue
        self.checkpointer = checkpointer
        self.buffers = buffers or StreamBuffers()
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._aborted: list[str] = []  # their checkpoints are deleted on the loop thread, after any snapshot
        self.draining = False
        self._drain_timeout = 0.0
        self._drained = threading.Event()
        self.drain_ok: bool | None = None
        self.on_first_output: list = []  # callbacks (request id, monotonic time), for restore timings

    # --- life cycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slam-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def drain(self, timeout: float) -> bool:
        """Graceful shutdown: admit nothing more, and let the loop thread stop stepping and checkpoint every
        request at once (snapshots must be taken at a step boundary, on the thread that steps). Blocks."""
        self.draining = True
        self._drain_timeout = timeout
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._checkpoint_all()
        else:
            self._drained.wait(timeout + 10)
        return bool(self.drain_ok)

    def _checkpoint_all(self) -> None:
        if self.checkpointer is not None and not self._drained.is_set():
            with self.engine.lock:
                seqs = list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting)
            seqs = [s for s in seqs if not s.aborted]
            t0 = time.monotonic()
            self.drain_ok = self.checkpointer.checkpoint_all(seqs, self._drain_timeout)
            log.warning("shutdown checkpoint of %d requests %s in %.2fs", len(seqs),
                        "done" if self.drain_ok else "TIMED OUT", time.monotonic() - t0)
        else:
            self.drain_ok = True
        self._drained.set()

    # --- called from asyncio handlers -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], sampling: SamplingParams, cache: CacheConfig, request_id: str) -> Stream:
        loop = asyncio.get_running_loop()
        if self.draining:
            raise Draining
        with self._lock:
            # Counted over our own registry, not the scheduler's queues, so the decision is exact under
            # concurrency; finished requests leave the registry in the loop thread, at once.
            if len(self._streams) >= self.capacity:
                self.metrics.rejected.inc()
                raise QueueFull
            # Registered under the lock before the loop thread can produce output for it.
            seq = self.engine.add_request(prompt_ids, sampling, cache, request_id=request_id)
            stream = Stream(seq, loop)
            self._streams[seq.request_id] = stream
            self.buffers.open(seq.request_id)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self._wake.set()
        return stream

    def release(self, stream: Stream) -> None:
        """The handler is done with a request: abort it if it still runs (client gone), so its cache frees."""
        with self._lock:
            self._streams.pop(stream.seq.request_id, None)
        if not stream.seq.finished and not stream.seq.aborted and not self.draining:
            # While draining, a closing connection is the shutdown itself: the request stays checkpointed.
            self.engine.abort(stream.seq)
            self.metrics.aborted.inc()
            self.buffers.finish(stream.seq.request_id, "aborted", "abort")
            with self._lock:
                self._aborted.append(stream.seq.request_id)
            self._wake.set()

    # --- the thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if self.draining:
                self._checkpoint_all()
                self._stop.wait(0.1)
                continue
            if not self.engine.has_work():
                self._delete_aborted()
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            self._step()

    def _step(self) -> None:
        replaced_before = self.engine.stats.replacements
        outputs = self.engine.step()
        self.metrics.steps.inc()
        self.metrics.replacements.inc(self.engine.stats.replacements - replaced_before)
        now = time.monotonic()
        generated = 0
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.seq.request_id)
                if out.error:
                    self.metrics.failed.inc()
                    if stream is not None:
                        del self._streams[out.seq.request_id]
                        self._deliver(stream, TokenEvent(len(out.seq.output_ids), -1, "", True, None, 0, 0, error=out.error))
                    continue
                generated += 1
                if stream is None:
                    continue  # released by its handler: aborted, reaped at the next step
                self._timing(stream, now)
                event = TokenEvent(len(out.seq.output_ids) - 1, out.token_id, out.text, out.finished,
                                   out.seq.finish_reason if out.finished else None, out.cache_tokens, out.cache_bytes)
                if out.finished:
                    del self._streams[out.seq.request_id]
                    self.metrics.success.labels(out.seq.finish_reason or "stop").inc()
                    self.metrics.e2e.observe(now - stream.arrival)
                self._deliver(stream, event)
        self.metrics.generation_tokens.inc(generated)
        self._record(outputs, now)
        self._update_gauges()

    def _record(self, outputs: list, now: float) -> None:
        """Buffer every token for resumable streams, then checkpoint (snapshots happen here, at the step
        boundary; uploads run on the checkpointer's thread)."""
        for out in outputs:
            seq = out.seq
            if out.error:
                self.buffers.finish(seq.request_id, "failed", "error")
                continue
            for cb in list(self.on_first_output):
                cb(seq.request_id, now)
            self.buffers.append(seq.request_id, len(seq.output_ids) - 1, out.token_id, out.text,
                                seq.finish_reason if out.finished else None)
        if self.checkpointer is not None:
            self.checkpointer.after_step([o.seq for o in outputs if not o.seq.aborted])
        self._delete_aborted()

    def _delete_aborted(self) -> None:
        with self._lock:
            gone, self._aborted = self._aborted, []
        if self.checkpointer is not None:
            for rid in gone:
                self.checkpointer.delete_request(rid)

    def _timing(self, stream: Stream, now: float) -> None:
        if stream.last_token is None:
            self.metrics.ttft.observe(now - stream.arrival)
        else:
            self.metrics.itl.observe(now - stream.last_token)
        stream.last_token = now

    @staticmethod
    def _deliver(stream: Stream, event: TokenEvent) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _update_gauges(self) -> None:
        running = [s for s in list(self.engine.scheduler.running) if s.slot is not None]
        self.metrics.kv_cache_bytes.set(sum(s.cache_bytes() for s in running))
        bounded = [s for s in running if s.cache_config.bounded]
        budget = sum(s.policy.budget for s in bounded)
        self.metrics.kv_budget_ratio.set(sum(s.cache_tokens() for s in bounded) / budget if budget else 0.0)
