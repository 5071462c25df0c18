"""The HTTP endpoints. Generation goes through the engine loop; one SSE event per generated token."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask

from slam.api.errors import APIError, error_body, error_response
from slam.api.events import Draining, QueueFull, Stream, TokenEvent, merged
from slam.api.loop import EngineLoop
from slam.api.prepare import Prepared, Preparer
from slam.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, TokenizeRequest, TokenizeResponse
from slam.api.shapes import Shape, usage
from slam.engine.engine import RequestError

router = APIRouter()
RETRY_AFTER_S = "1"


def _state(request: Request) -> tuple[EngineLoop, Preparer]:
    return request.app.state.loop, request.app.state.preparer


def _submit(loop: EngineLoop, prepared: Prepared, request_id: str) -> list[Stream]:
    try:
        return loop.submit_choices(prepared.prompt_ids, prepared.choices(), prepared.cache, request_id)
    except Draining:
        raise APIError(503, "the server is shutting down; retry on another replica", None, "shutting_down",
                       {"Retry-After": RETRY_AFTER_S}) from None
    except QueueFull:
        raise APIError(429, f"the server is at capacity ({loop.capacity} requests in flight); retry later",
                       None, "queue_full", {"Retry-After": RETRY_AFTER_S}) from None
    except RequestError as exc:
        raise APIError(400, str(exc), None, "invalid_value") from exc


async def _sse(loop: EngineLoop, streams: list[Stream], shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    # `finally` runs when the client disconnects too (Starlette cancels this generator): a dropped stream
    # keeps running for the resume grace (GET /v1/requests/{id}/stream), then is aborted.
    try:
        started: set[int] = set()
        failed = False
        async for event in merged(streams):
            if event.error:
                yield f"data: {json.dumps(error_body(500, event.error, None, 'engine_error'))}\n\n"
                failed = True
                break
            chunk = shape.chunk(event, event.choice not in started)
            started.add(event.choice)
            if include_usage:
                chunk["usage"] = None
            sse_id = f"id: {event.index}\n" if len(streams) == 1 else ""
            yield f"{sse_id}data: {json.dumps(chunk)}\n\n"
        if include_usage and not failed:
            yield f"data: {json.dumps(shape.usage_chunk(usage(streams)))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for stream in streams:
            loop.detach(stream)


async def _collect(streams: list[Stream]) -> dict[int, list[TokenEvent]]:
    events: dict[int, list[TokenEvent]] = {s.choice: [] for s in streams}
    async for event in merged(streams):
        events[event.choice].append(event)
    return events


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read: only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _generate(request: Request, body: SamplingFields, prepared: Prepared, chat: bool) -> Response:
    loop, preparer = _state(request)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    shape = Shape(chat, request_id, preparer.model_name, preparer.engine.tokenizer, prepared.echo)
    streams = _submit(loop, prepared, request_id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # The background task covers a client gone before the generator ever ran (its `finally` then
        # never runs); detach is idempotent.
        return StreamingResponse(_sse(loop, streams, shape, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": request_id},
                                 background=BackgroundTask(_detach_all, loop, streams))
    # A non-streaming client that leaves cannot resume: its request is aborted at once.
    collect, gone = asyncio.ensure_future(_collect(streams)), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (collect, gone):
            task.cancel()
        for stream in streams:
            loop.release(stream)
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    events = collect.result()
    error = next((e.error for evs in events.values() for e in evs if e.error), None)
    if error:
        return error_response(500, error, None, "engine_error")
    return JSONResponse(shape.full(streams, events), headers={"X-Request-Id": request_id})


def _detach_all(loop: EngineLoop, streams: list[Stream]) -> None:
    for stream in streams:
        loop.detach(stream)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    # Tokenizing a long prompt takes a while: off the event loop, so other clients' streams keep flowing.
    return await _generate(request, body, await asyncio.to_thread(_state(request)[1].completion, body), chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    return await _generate(request, body, await asyncio.to_thread(_state(request)[1].chat, body), chat=True)


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
        ids = await asyncio.to_thread(preparer.encode, body.prompt)
    else:
        ids = await asyncio.to_thread(preparer.encode_messages, body.messages or [])
    return TokenizeResponse(tokens=ids, count=len(ids))


def _fenced(request: Request) -> str | None:
    """Why this server may no longer checkpoint (another pod holds its slot's epoch), or None."""
    return getattr(getattr(request.app.state, "checkpointer", None), "fenced", None)


@router.get("/health")
async def health(request: Request) -> Response:
    loop: EngineLoop | None = getattr(request.app.state, "loop", None)
    if loop is not None and not loop.healthy:
        return error_response(503, f"the engine loop has stopped: {loop.fatal or 'its thread died'}", None,
                              "engine_dead")
    # A pod that lost its slot's epoch to another cannot checkpoint: restarted, it is refused at start
    # (the epoch is claimed), so its operator replaces it at the next epoch.
    if fenced := _fenced(request):
        return error_response(503, f"checkpoints are fenced off: {fenced}", None, "fenced")
    return JSONResponse({"status": "alive"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    loop: EngineLoop | None = getattr(request.app.state, "loop", None)
    if loop is None or not loop.alive or not loop.healthy:
        return error_response(503, "the engine loop is not running", None, "not_ready")
    if _fenced(request):
        return error_response(503, "another pod holds this slot's epoch", None, "fenced")
    if loop.draining:
        return error_response(503, "the server is shutting down", None, "shutting_down")
    return JSONResponse({"status": "ready", "model": request.app.state.preparer.model_name})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
