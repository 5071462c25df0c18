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

from slam.api.metrics import Metrics
from slam.config import CacheConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams, Sequence

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


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: Metrics, max_queue: int):
        self.engine = engine
        self.metrics = metrics
        self.capacity = engine.config.max_batch + max_queue
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    # --- called from asyncio handlers -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], sampling: SamplingParams, cache: CacheConfig, request_id: str) -> Stream:
        loop = asyncio.get_running_loop()
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
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self._wake.set()
        return stream

    def release(self, stream: Stream) -> None:
        """The handler is done with a request: abort it if it still runs (client gone), so its cache frees."""
        with self._lock:
            self._streams.pop(stream.seq.request_id, None)
        if not stream.seq.finished and not stream.seq.aborted:
            self.engine.abort(stream.seq)
            self.metrics.aborted.inc()
            self._wake.set()

    # --- the thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
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
        self._update_gauges()

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
        running = [s for s in list(self.engine.scheduler.running) if s.caches is not None]
        self.metrics.kv_cache_bytes.set(sum(s.cache_bytes() for s in running))
        bounded = [s for s in running if s.policy.budget is not None]
        budget = sum(s.policy.budget for s in bounded)
        self.metrics.kv_budget_ratio.set(sum(s.cache_tokens() for s in bounded) / budget if budget else 0.0)
