"""The engine loop: one background thread steps the engine while there is work; asyncio handlers get
their tokens through per-request queues.

Continuous batching comes from the engine's scheduler: requests join and leave between steps. This thread
routes each step's outputs to the request that owns them, via `loop.call_soon_threadsafe`, and keeps the
metrics that need the step's view. It is supervised: an exception while handling one request's output
fails that request; an exception of a whole step fails the requests of that step; only when steps keep
failing does the loop give up, which turns /health into 503 so that the pod is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING

from slam.api.events import Draining, QueueFull, Stream, TokenEvent
from slam.api.metrics import Metrics
from slam.api.routing import StepRouting
from slam.api.streams import StreamBuffers
from slam.config import CacheConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams, Sequence

if TYPE_CHECKING:
    from slam.checkpoint import Checkpointer

log = logging.getLogger("slam.api")
MAX_FAILED_STEPS = 3  # consecutive failed iterations before the loop gives up
__all__ = ["Draining", "EngineLoop", "QueueFull", "Stream", "TokenEvent"]


class EngineLoop(StepRouting):
    def __init__(self, engine: LLMEngine, metrics: Metrics, max_queue: int,
                 checkpointer: Checkpointer | None = None, buffers: StreamBuffers | None = None,
                 resume_grace_s: float = 0.0):
        self.engine = engine
        self.metrics = metrics
        self.capacity = engine.config.max_batch + max_queue
        self.checkpointer = checkpointer
        if checkpointer is not None:  # snapshots need requests at rest: due ones sit out steps launched ahead
            engine.barrier = checkpointer.due_next
        self.buffers = buffers or StreamBuffers()
        self.resume_grace_s = resume_grace_s
        self._streams: dict[str, Stream] = {}
        self._detached: dict[str, tuple[Sequence, float]] = {}  # dropped streams within their resume grace
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._aborted: list[str] = []  # their checkpoints are deleted on the loop thread, after any snapshot
        self.draining = False
        self._drain_timeout = 30.0  # for the shutdown checkpoint; drain() sets it
        self._drain_deadline = 0.0
        self._drained = threading.Event()
        self.drain_ok: bool | None = None
        self.fatal: str | None = None  # why the loop gave up
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

    @property
    def healthy(self) -> bool:
        """False once the loop gave up or its thread died: no request would ever be served again."""
        return self.fatal is None and (self._thread is None or self._thread.is_alive() or self._stop.is_set())

    def stop_admission(self, finish_timeout: float) -> None:
        if not self.draining:
            self._drain_deadline = time.monotonic() + finish_timeout
            self.draining = True
            self._wake.set()

    def drain(self, timeout: float, finish_timeout: float = 0.0) -> bool:
        """Graceful shutdown: admit nothing more. With checkpoints, the loop thread stops stepping and
        checkpoints every request at once (snapshots are taken at a step boundary, on the thread that
        steps); without, running requests get up to `finish_timeout` seconds to finish. Blocks."""
        self._drain_timeout = timeout
        self.stop_admission(finish_timeout)
        if self._thread is None or not self._thread.is_alive():
            self._checkpoint_all()
        else:
            self._drained.wait((timeout if self.checkpointer else finish_timeout) + 10)
        return bool(self.drain_ok)

    def _checkpoint_all(self) -> None:
        if self.engine.in_flight is not None:  # its tokens go to their clients, and every request is at rest
            self._step(self.engine.settle)
        if self.checkpointer is not None and not self._drained.is_set():
            with self.engine.lock:
                seqs = list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting)
            seqs = [s for s in seqs if not s.aborted]
            t0 = time.monotonic()
            self.drain_ok = self.checkpointer.checkpoint_all(seqs, self._drain_timeout)
            log.warning("shutdown checkpoint of %d requests %s in %.2fs", len(seqs),
                        "done" if self.drain_ok else "TIMED OUT", time.monotonic() - t0)
        elif self.drain_ok is None:
            self.drain_ok = not self.engine.has_work()  # False: the drain timeout cut running requests
        self._drained.set()

    # --- called from asyncio handlers -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], sampling: SamplingParams, cache: CacheConfig, request_id: str) -> Stream:
        return self.submit_choices(prompt_ids, [sampling], cache, request_id)[0]

    def submit_choices(self, prompt_ids: list[int], choices: list[SamplingParams], cache: CacheConfig,
                       request_id: str) -> list[Stream]:
        """Admit all choices of a request, or none (429). Choice i > 0 runs as `<request_id>-<i>`."""
        loop = asyncio.get_running_loop()
        if self.draining or not self.healthy:
            raise Draining
        queue: asyncio.Queue = asyncio.Queue()
        streams = []
        with self._lock:
            # Counted over our own registry, not the scheduler's queues, so the decision is exact under
            # concurrency; finished requests leave the registry in the loop thread, at once.
            if len(self._streams) + len(self._detached) + len(choices) > self.capacity:
                self.metrics.rejected.inc()
                raise QueueFull
            for i, sampling in enumerate(choices):
                rid = request_id if i == 0 else f"{request_id}-{i}"
                # Registered under the lock before the loop thread can produce output for it.
                seq = self.engine.add_request(prompt_ids, sampling, cache, request_id=rid)
                streams.append(Stream(seq, loop, queue, choice=i))
                self._streams[rid] = streams[-1]
                self.buffers.open(rid)
        self.metrics.prompt_tokens.inc(len(prompt_ids) * len(choices))
        self._wake.set()
        return streams

    def release(self, stream: Stream) -> None:
        """The handler is done with a request: abort it if it still runs (client gone), so its cache frees."""
        with self._lock:
            self._streams.pop(stream.seq.request_id, None)
            self._detached.pop(stream.seq.request_id, None)
        if stream.seq.finished or stream.seq.aborted:
            return
        if self.draining and self.checkpointer is not None:
            return  # a closing connection while draining is the shutdown itself: the request stays checkpointed
        self._abort(stream.seq)

    def detach(self, stream: Stream) -> None:
        """A streaming client went away: keep the request running for the resume grace, so the client can
        follow it again with GET /v1/requests/{id}/stream; abort it if nobody does."""
        if self.resume_grace_s <= 0 or stream.seq.finished or stream.seq.aborted or self.draining:
            return self.release(stream)
        with self._lock:
            if self._streams.pop(stream.seq.request_id, None) is None:
                return  # already finished or released
            self._detached[stream.seq.request_id] = (stream.seq, time.monotonic() + self.resume_grace_s)
        self._wake.set()

    def _abort(self, seq: Sequence) -> None:
        self.engine.abort(seq)
        self.metrics.aborted.inc()
        self.buffers.finish(seq.request_id, "aborted", "abort")
        with self._lock:
            self._aborted.append(seq.request_id)
        self._wake.set()

    # --- the thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set() and self.fatal is None:
            try:
                self._iteration()
                failures = 0
            except Exception as exc:  # a whole step failed: fail its requests, go on unless it keeps failing
                failures += 1
                log.exception("engine loop iteration failed (%d in a row)", failures)
                self._recover(f"engine error: {type(exc).__name__}: {exc}", failures)

    def _recover(self, message: str, failures: int) -> None:
        if failures >= MAX_FAILED_STEPS:
            self.fatal = message
            log.critical("the engine loop gives up after %d failed steps; /health is now 503", failures)
        try:
            self._fail_running(message, everything=self.fatal is not None)
        except Exception:  # not even failing requests works: nothing here can be trusted any more
            log.exception("failing the requests of a failed step failed too")
            self.fatal = self.fatal or message

    def _iteration(self) -> None:
        if self.draining and (self.checkpointer is not None or not self._finishing()):
            self._checkpoint_all()
            self._stop.wait(0.1)
            return
        self._expire_detached()
        if not self.engine.has_work():
            self._delete_aborted()
            self._wake.wait(0.1)
            self._wake.clear()
            return
        self._step()

    def _finishing(self) -> bool:
        """Draining without checkpoints: keep stepping while requests run and the drain timeout allows."""
        return self.engine.has_work() and time.monotonic() < self._drain_deadline

    def _expire_detached(self) -> None:
        now = time.monotonic()
        with self._lock:
            detached = list(self._detached.items())
        for rid, (seq, deadline) in detached:
            rec = self.buffers.get(rid)
            if rec is not None and rec.waiters:  # a client follows it again: the grace starts over when it leaves
                with self._lock:
                    if rid in self._detached:
                        self._detached[rid] = (seq, now + self.resume_grace_s)
            elif now >= deadline:
                with self._lock:
                    self._detached.pop(rid, None)
                if not seq.finished and not seq.aborted:
                    self._abort(seq)

    def _fail_running(self, message: str, everything: bool = False) -> None:
        """Fail the requests of a step that could not complete (all open requests when giving up)."""
        with self.engine.lock:
            seqs = list(self.engine.scheduler.running)
            if everything:
                seqs += list(self.engine.scheduler.waiting)
        with self._lock:
            if everything:
                seqs += [s.seq for s in self._streams.values()] + [seq for seq, _ in self._detached.values()]
            for seq in {id(s): s for s in seqs}.values():
                self._fail(seq, message)

    def _fail(self, seq: Sequence, message: str) -> None:
        """Fail one request (caller holds self._lock): its client gets an error, its cache is freed."""
        seq.aborted = True
        if seq.finish_reason is None:
            seq.finish_reason = "error"
        self.metrics.failed.inc()
        self._detached.pop(seq.request_id, None)
        stream = self._streams.pop(seq.request_id, None)
        if stream is not None:
            self._deliver(stream, TokenEvent(len(seq.output_ids), -1, "", True, None, 0, 0, error=message,
                                             choice=stream.choice))
        try:
            self.buffers.finish(seq.request_id, "failed", "error")
        except Exception:  # the client already has its error; a resumed stream may miss the end
            log.exception("could not mark request %s failed in its buffer", seq.request_id)
