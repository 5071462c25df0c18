"""Finding which replica owns a request (from the checkpoint manifests in S3) and proxying to it.

A client that reconnects to a replica that does not hold the request's buffer is forwarded, streaming, to
the URL in the newest manifest that names the request, in any slot under the prefix, if that URL's host is
one of the trusted peers (--peer-domain); a manifest naming any other host is ignored, since anyone who
can write to the bucket could otherwise point replicas anywhere. The forward authenticates with this
replica's own token (SLAM_REPLICA_TOKEN), never with the client's credentials. A forwarded request
carries `X-Slam-Proxied`, and is never forwarded again: two replicas that each think the other owns a
request answer 404 instead of looping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from slam.checkpoint import ObjectStore
from slam.checkpoint import format as fmt
from slam.checkpoint.restore import MANIFEST_RE

log = logging.getLogger("slam.api")
PROXIED_HEADER = "X-Slam-Proxied"
FORWARD_HEADERS = ("last-event-id", "accept")


def find_owner(store: ObjectStore, request_id: str) -> str | None:
    """Owner URL of the newest readable manifest of `request_id` in any slot; None if there is none."""
    prefix = store.config.prefix.strip("/")
    base = prefix + "/" if prefix else ""
    try:
        fmt.request_dir(prefix, 0, request_id)  # rejects ids that cannot name a directory
    except ValueError:
        return None
    # One level down are the slots; listing them (not every object of every request) keeps this cheap.
    try:
        store.ensure_bucket()
        slots = [o.object_name for o in store.client.list_objects(store.bucket, prefix=base, recursive=False)
                 if o.is_dir]
    except Exception as e:  # store down: we cannot know, so we say we do not
        log.warning("owner lookup of %s failed: %s", request_id, e)
        return None
    best: tuple[float, str] | None = None
    for slot_dir in slots:
        root = f"{slot_dir}{request_id}/"
        for name in store.list(root):
            if not MANIFEST_RE.match(name[len(root):]):
                continue
            try:
                m = fmt.decode_manifest(store.get(name))
            except Exception:
                continue
            if m.get("request_id") == request_id and m.get("owner_url"):
                key = (float(m.get("created_unix", 0)), m["owner_url"])
                best = key if best is None or key > best else best
    return None if best is None else best[1]


def trusted(url: str, peers: list[str]) -> bool:
    """Whether `url` is an http(s) URL whose host is one of `peers` or lies in one of their domains."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        return False
    return any(host == p or host.endswith("." + p) for p in (p.lower().strip(".") for p in peers) if p)


async def forward(owner: str, path: str, headers: dict[str, str], token: str = "") -> Response:
    """GET `owner`+`path`, streamed back as it arrives (SSE included), authenticated with `token`."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
    sent = {k: v for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
    sent[PROXIED_HEADER] = "1"
    if token:
        sent["Authorization"] = f"Bearer {token}"
    try:
        upstream = await client.send(client.build_request("GET", owner.rstrip("/") + path, headers=sent), stream=True)
    except httpx.HTTPError:
        await client.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        async for chunk in upstream.aiter_raw():
            yield chunk

    async def close() -> None:
        await upstream.aclose()
        await client.aclose()

    keep = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "cache-control")}
    keep["X-Slam-Owner"] = owner
    return StreamingResponse(body(), status_code=upstream.status_code, headers=keep, background=BackgroundTask(close))


async def owner_of(store: ObjectStore | None, request_id: str) -> str | None:
    if store is None:
        return None
    return await asyncio.to_thread(find_owner, store, request_id)
