"""The HTTP endpoints. Generation goes through the engine loop; one SSE event per generated token."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask

from slam.api.errors import APIError, error_body, error_response
from slam.api.loop import Draining, EngineLoop, QueueFull, Stream, TokenEvent
from slam.api.prepare import Prepared, Preparer
from slam.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, TokenizeRequest, TokenizeResponse
from slam.engine.engine import RequestError

router = APIRouter()
RETRY_AFTER_S = "1"
DISCONNECT_POLL_S = 0.5


def _state(request: Request) -> tuple[EngineLoop, Preparer]:
    return request.app.state.loop, request.app.state.preparer


def _usage(stream: Stream) -> dict[str, int]:
    prompt, completion = len(stream.seq.prompt_ids), len(stream.seq.output_ids)
    last = stream.last
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "cache_tokens": last.cache_tokens if last else 0, "cache_bytes": last.cache_bytes if last else 0}


def _submit(loop: EngineLoop, prepared: Prepared, request_id: str) -> Stream:
    try:
        return loop.submit(prepared.prompt_ids, prepared.sampling, prepared.cache, request_id)
    except Draining:
        raise APIError(503, "the server is shutting down; retry on another replica", None, "shutting_down",
                       {"Retry-After": RETRY_AFTER_S}) from None
    except QueueFull:
        raise APIError(429, f"the server is at capacity ({loop.capacity} requests in flight); retry later",
                       None, "queue_full", {"Retry-After": RETRY_AFTER_S}) from None
    except RequestError as exc:
        raise APIError(400, str(exc), None, "invalid_value") from exc


class Shape:
    """How one endpoint's responses and chunks look (completions vs chat)."""

    def __init__(self, chat: bool, request_id: str, model: str):
        self.chat, self.id, self.model, self.created = chat, request_id, model, int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, event: TokenEvent, first: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": event.text} if first else {"content": event.text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": event.finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}

    def full(self, stream: Stream) -> dict[str, Any]:
        text, reason = stream.seq.output_text, stream.seq.finish_reason
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            return {**self._base("chat.completion"), "choices": [choice], "usage": _usage(stream)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._base("text_completion"), "choices": [choice], "usage": _usage(stream)}


async def _sse(loop: EngineLoop, stream: Stream, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    # `finally` runs when the client disconnects too (Starlette cancels this generator): the abort frees
    # the request's cache at the next step.
    try:
        first = True
        async for event in stream.events():
            if event.error:
                yield f"data: {json.dumps(error_body(500, event.error, None, 'engine_error'))}\n\n"
                break
            chunk = shape.chunk(event, first)
            if include_usage:
                chunk["usage"] = None
            yield f"id: {event.index}\ndata: {json.dumps(chunk)}\n\n"
            first = False
        else:
            if include_usage:
                yield f"data: {json.dumps(shape.usage_chunk(_usage(stream)))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        loop.release(stream)


async def _collect(request: Request, loop: EngineLoop, stream: Stream) -> TokenEvent | None:
    """Wait for the last token; None if the client went away first (then the request is aborted)."""
    try:
        while True:
            try:  # cancelling a queue.get() on timeout loses nothing
                event = await asyncio.wait_for(stream.next_event(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if event.finished or event.error:
                return event
    finally:
        loop.release(stream)


async def _generate(request: Request, body: SamplingFields, prepared: Prepared, chat: bool) -> Response:
    loop, preparer = _state(request)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    shape = Shape(chat, request_id, preparer.model_name)
    stream = _submit(loop, prepared, request_id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # The background release covers a client gone before the generator ever ran (its `finally` then
        # never runs); release is idempotent.
        return StreamingResponse(_sse(loop, stream, shape, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": request_id},
                                 background=BackgroundTask(loop.release, stream))
    last = await _collect(request, loop, stream)
    if last is None:
        return Response(status_code=499)  # nobody is listening any more
    if last.error:
        return error_response(500, last.error, None, "engine_error")
    return JSONResponse(shape.full(stream), headers={"X-Request-Id": request_id})


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    return await _generate(request, body, _state(request)[1].completion(body), chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    return await _generate(request, body, _state(request)[1].chat(body), chat=True)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    name = _state(request)[1].model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": request.app.state.started,
                                        "owned_by": "slam"}]}


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
    preparer = _state(request)[1]
    preparer.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", "prompt", "invalid_value")
    if body.prompt is not None:
        ids = preparer.engine.encode(body.prompt)
    else:
        ids = preparer.encode_messages(body.messages or [])
    return TokenizeResponse(tokens=ids, count=len(ids))


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    loop: EngineLoop | None = getattr(request.app.state, "loop", None)
    if loop is None or not loop.alive:
        return error_response(503, "the engine loop is not running", None, "not_ready")
    if loop.draining:
        return error_response(503, "the server is shutting down", None, "shutting_down")
    return JSONResponse({"status": "ready", "model": request.app.state.preparer.model_name})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
