"""Per-request token buffers that make streams resumable: `GET /v1/requests/{id}/stream` + `Last-Event-ID`.

Every generated token of every request is appended here by the engine thread, whether or not a client is
attached (restored requests have none), with its global index (the SSE `id:`). A reconnecting client gets
the tokens after the index it last saw: exactly once, in order. Memory is bounded: a finished request's
buffer is dropped after `retention_s`, or earlier, oldest first, when more than `max_finished` are kept.
Running requests are never dropped (their number is bounded by the server's capacity).

Resumed-stream chunk format (documented in README/docs): one SSE event per token,

    id: <index>
    data: {"id": <request id>, "index": <index>, "token_id": <int>, "text": <delta>, "finish_reason": null|str}

then `data: [DONE]` once the request has finished.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

RETENTION_S = 600.0
MAX_FINISHED = 1024
WAIT_POLL_S = 1.0  # upper bound on a missed wake-up; a wake-up normally comes with the token


@dataclass
class Token:
    index: int
    token_id: int
    text: str


@dataclass(eq=False)
class Record:
    request_id: str
    tokens: list[Token] = field(default_factory=list)
    status: str = "running"  # running | finished | aborted | failed
    finish_reason: str | None = None
    finished_at: float | None = None
    restore: dict[str, Any] | None = None  # timings of a restore (for `slam bench failover`)
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status != "running"

    def summary(self) -> dict[str, Any]:
        body = {"id": self.request_id, "status": self.status, "output_ids": [t.token_id for t in self.tokens],
                "text": "".join(t.text for t in self.tokens), "finish_reason": self.finish_reason}
        if self.restore is not None:
            body["restore"] = self.restore
        return body


class StreamBuffers:
    def __init__(self, retention_s: float = RETENTION_S, max_finished: int = MAX_FINISHED):
        self.retention_s, self.max_finished = retention_s, max_finished
        self._records: OrderedDict[str, Record] = OrderedDict()
        self._finished: OrderedDict[str, float] = OrderedDict()  # finish order, for eviction
        self._lock = threading.Lock()

    # --- engine thread --------------------------------------------------------------------------------
    def open(self, request_id: str, earlier: list[tuple[int, str]] | None = None) -> Record:
        """Start a request's buffer; `earlier` are (token id, text) generated before a restore."""
        rec = Record(request_id, [Token(i, t, s) for i, (t, s) in enumerate(earlier or [])])
        with self._lock:
            self._records[request_id] = rec
        return rec

    def append(self, request_id: str, index: int, token_id: int, text: str, finish_reason: str | None,
               status: str | None = None) -> None:
        with self._lock:
            rec = self._records.get(request_id)
            if rec is None:
                return
            if index == len(rec.tokens) and token_id >= 0:  # never a gap or a repeat
                rec.tokens.append(Token(index, token_id, text))
            if status is not None or finish_reason is not None:
                self._finish(rec, status or "finished", finish_reason)
            waiters = list(rec.waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that client's event loop is gone
                pass

    def finish(self, request_id: str, status: str, finish_reason: str | None) -> None:
        self.append(request_id, -1, -1, "", finish_reason, status)

    def _finish(self, rec: Record, status: str, reason: str | None) -> None:
        if rec.done:
            return
        rec.status, rec.finish_reason, rec.finished_at = status, reason, time.monotonic()
        self._finished[rec.request_id] = rec.finished_at
        self._evict()

    def _evict(self) -> None:
        now = time.monotonic()
        while self._finished:
            rid, at = next(iter(self._finished.items()))
            if now - at < self.retention_s and len(self._finished) <= self.max_finished:
                break
            del self._finished[rid]
            self._records.pop(rid, None)

    # --- asyncio handlers -----------------------------------------------------------------------------
    def get(self, request_id: str) -> Record | None:
        with self._lock:
            self._evict()
            return self._records.get(request_id)

    async def follow(self, rec: Record, after: int) -> AsyncIterator[Token]:
        """Tokens with index > `after`, waiting for new ones until the request is done."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            rec.waiters.append((loop, event))
        try:
            while True:
                event.clear()
                with self._lock:
                    new = rec.tokens[after + 1 :]
                    done = rec.done
                for tok in new:
                    yield tok
                    after = tok.index
                if done and not new:
                    return
                if not new:
                    try:
                        await asyncio.wait_for(event.wait(), WAIT_POLL_S)
                    except asyncio.TimeoutError:
                        pass
        finally:
            with self._lock:
                rec.waiters.remove((loop, event))
