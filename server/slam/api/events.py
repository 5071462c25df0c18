"""What the engine thread hands to the asyncio handlers: one event per generated token, per request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from slam.engine.sequence import Sequence


class QueueFull(Exception):
    """More requests in flight than max_batch + max_queue."""


class Draining(Exception):
    """The server is shutting down: it admits nothing new."""


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
    choice: int = 0
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(eq=False)
class Stream:
    """One choice of one request. The choices of a request share their `queue`, so a handler reads them
    in the order the engine produced them."""

    seq: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    choice: int = 0
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


async def merged(streams: list[Stream]) -> AsyncIterator[TokenEvent]:
    """Events of all choices of one request (one shared queue) until every choice has ended."""
    open_choices = {s.choice for s in streams}
    by_choice = {s.choice: s for s in streams}
    queue = streams[0].queue
    while open_choices:
        event: TokenEvent = await queue.get()
        by_choice[event.choice].last = event
        yield event
        if event.finished or event.error:
            open_choices.discard(event.choice)
