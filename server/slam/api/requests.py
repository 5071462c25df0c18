"""`GET /v1/requests/{id}` and `GET /v1/requests/{id}/stream`: a request's state and its resumable stream.

Served from this replica's token buffers (api/streams.py); a request this replica does not hold is
proxied to the owner named in its checkpoint manifest (api/proxy.py), else 404 in the OpenAI shape.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slam.api.errors import APIError
from slam.api.proxy import PROXIED_HEADER, forward, owner_of, trusted
from slam.api.streams import Record, StreamBuffers

router = APIRouter()
log = logging.getLogger("slam.api")
# Ids this server gives (cmpl-<hex>, chatcmpl-<hex>, and -<choice>): anything else is not a request here.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def is_resume_path(path: str) -> bool:
    return path.startswith("/v1/requests/")


async def _local_or_proxy(request: Request, request_id: str) -> Record | Response:
    if not REQUEST_ID.fullmatch(request_id):
        raise APIError(404, "no such request: request ids are letters, digits, '.', '_' and '-'", None,
                       "request_not_found")
    buffers: StreamBuffers = request.app.state.loop.buffers
    rec = buffers.get(request_id)
    if rec is not None:
        return rec
    if not request.headers.get(PROXIED_HEADER):
        owner = await owner_of(request.app.state.store, request_id)
        settings = request.app.state.settings
        if owner and not trusted(owner, settings.peers):
            log.warning("ignoring the owner %r of request %s: not a trusted peer (--peer-domain)", owner, request_id)
        elif owner and owner.rstrip("/") != request.app.state.public_url.rstrip("/"):
            try:
                return await forward(owner, request.url.path, dict(request.headers),
                                     settings.replica_token.get_secret_value())
            except httpx.HTTPError as exc:
                raise APIError(502, f"request {request_id} belongs to {owner}, which does not answer: {exc}",
                               None, "owner_unreachable") from exc
    raise APIError(404, f"no request {request_id!r} on this server or in the checkpoint store", None,
                   "request_not_found")


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id", "").strip()
    if not raw:
        return -1  # from the first token
    try:
        index = int(raw)
    except ValueError:
        index = -2
    if index < -1:
        raise APIError(400, f"Last-Event-ID must be a token index, got {raw!r}", None, "invalid_value")
    return index


@router.get("/v1/requests/{request_id}")
async def get_request(request: Request, request_id: str) -> Response:
    found = await _local_or_proxy(request, request_id)
    return found if isinstance(found, Response) else JSONResponse(found.summary())


@router.get("/v1/requests/{request_id}/stream")
async def stream_request(request: Request, request_id: str) -> Response:
    after = _last_event_id(request)
    found = await _local_or_proxy(request, request_id)
    if isinstance(found, Response):
        return found
    buffers: StreamBuffers = request.app.state.loop.buffers

    async def events() -> AsyncIterator[str]:
        async for tok in buffers.follow(found, after):
            last = found.done and tok.index == len(found.tokens) - 1
            chunk = {"id": request_id, "index": tok.index, "token_id": tok.token_id, "text": tok.text,
                     "finish_reason": found.finish_reason if last else None}
            yield f"id: {tok.index}\ndata: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"  # follow() returns only once the request is done

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})
