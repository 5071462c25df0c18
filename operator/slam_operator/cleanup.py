"""Deleting a resource (its finalizer): pods, Services, and with checkpoint.deleteOnCleanup its checkpoint
objects, with the MinIO client."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterable
from typing import Any

import kopf

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from slam.checkpoint.layout import slot_dir

from slam_operator.failover import TERMINAL, NodeView, node_failed
from slam_operator.kube import Kube
from slam_operator.reconcile import pod_view
from slam_operator.spec import CheckpointSpec, SpecError, parse_spec
from slam_operator.status import slot_memory


async def finalize(kube: Kube, body: Any, spec: Any, status: Any, nodes: dict[str, NodeView], lock: asyncio.Lock,
                   poll_seconds: float) -> None:
    """Delete the pods (gracefully: they drain; grace 0 on a dead node), then, once they are gone, the Services
    and the checkpoints; TemporaryError while pods remain."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    try:
        parsed = parse_spec(spec)
    except SpecError:
        parsed = None  # still clean up what can be: pods and Services
    grace = parsed.nodeFailureGraceSeconds if parsed else 0
    now = datetime.datetime.now(datetime.timezone.utc)
    remaining = [p for p in map(pod_view, await kube.list_pods(namespace, name)) if p is not None]
    async with lock:
        for pod in remaining:
            force = node_failed(pod.node, nodes, now, grace) or pod.phase in TERMINAL
            if force or not pod.deleting:
                await kube.delete_pod(namespace, pod.name, force=force)
    if remaining:
        raise kopf.TemporaryError(f"waiting for {len(remaining)} pods to terminate", delay=poll_seconds)
    for service in (name, f"{name}-pods"):
        await kube.delete_service(namespace, service)
    if parsed is not None and parsed.checkpoint.enabled and parsed.checkpoint.deleteOnCleanup:
        slots = sorted(set(range(parsed.replicas)) | set(slot_memory(status)))
        count = await delete_checkpoints(kube, namespace, parsed.checkpoint, slots)
        kopf.event(body, type="Normal", reason="CheckpointsDeleted",
                   message=f"deleted {count} checkpoint objects of slots {slots}")


async def delete_checkpoints(kube: Kube, namespace: str, checkpoint: CheckpointSpec, slots: Iterable[int]) -> int:
    """Remove every object under `<prefix>/<slot>/` (all epochs) of the given slots; the count removed."""
    access = secret = None
    if checkpoint.secretRef is not None:
        ref = checkpoint.secretRef
        access = await kube.secret_value(namespace, ref.name, ref.accessKeyKey)
        secret = await kube.secret_value(namespace, ref.name, ref.secretKeyKey)
    client = Minio(checkpoint.endpoint, access_key=access, secret_key=secret, secure=checkpoint.secure)
    return await asyncio.to_thread(_delete, client, checkpoint.bucket, [slot_dir(checkpoint.prefix, s) for s in slots])


def _delete(client: Minio, bucket: str, prefixes: list[str]) -> int:
    count = 0
    for prefix in prefixes:
        try:
            names = [o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)]
        except S3Error as e:
            if e.code == "NoSuchBucket":
                return 0
            raise
        for error in client.remove_objects(bucket, [DeleteObject(n) for n in names]):
            raise RuntimeError(f"could not delete checkpoint object {error.name}: {error.message}")
        count += len(names)
    return count
