"""Finding which replica owns a request (from the checkpoint manifests in S3) and proxying to it.

A client that reconnects to a replica that does not hold the request's buffer is forwarded, streaming, to
the URL in the newest manifest (or, once it finished, the finished record) that names the request at the
highest claimed epoch of its slot (format.py;
a pod cut off from the cluster may still write older epochs, with newer timestamps), if that URL's host is
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
from slam.checkpoint.restore import MANIFEST_RE, latest_epoch

log = logging.getLogger("slam.api")
PROXIED_HEADER = "X-Slam-Proxied"
FORWARD_HEADERS = ("last-event-id", "accept")


def find_owner(store: ObjectStore, request_id: str) -> str | None:
    """Owner URL in the newest readable manifest of `request_id` at the highest claimed epoch of any slot;
    None if there is none."""
    prefix = store.config.prefix
    try:
        fmt.request_dir(prefix, 0, request_id)  # rejects ids that cannot name a directory
    except ValueError:
        return None
    try:
        # One level down are the slots; listing them (not every object of every request) keeps this cheap.
        slots = [n for d in store.list_dirs(fmt.root_dir(prefix)) if (n := fmt.dir_number(d)) is not None]
        found = [owner for slot in slots if (owner := _slot_owner(store, prefix, slot, request_id))]
    except Exception as e:  # store down: we cannot know, so we say we do not
        log.warning("owner lookup of %s failed: %s", request_id, e)
        return None
    # A request in two slots is one whose restore by another slot has not yet deleted the old copy.
    return max(found)[1] if found else None


def _slot_owner(store: ObjectStore, prefix: str, slot: int, request_id: str) -> tuple[float, str] | None:
    epoch = latest_epoch(store, slot, prefix)
    if epoch is None:
        return None
    root = fmt.request_dir(prefix, slot, request_id, epoch)
    for _ in range(2):  # the request may finish between the listing and the reads: its record is then new
        names = store.list(root)
        versions = sorted((m.group(1) for n in names if (m := MANIFEST_RE.match(n[len(root):]))), reverse=True)
        # A finished request's record, else its manifests newest first: the first that names an owner.
        candidates = ([root + fmt.FINISHED] if root + fmt.FINISHED in names else []) + \
            [f"{root}v{v}/{fmt.MANIFEST}" for v in versions]
        if not candidates:
            return None
        for name in candidates:
            try:
                m = fmt.decode_manifest(store.get(name))
            except Exception:
                continue
            if m.get("request_id") == request_id and m.get("owner_url"):
                return float(m.get("finished_unix", m.get("created_unix", 0))), m["owner_url"]
    return None


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
