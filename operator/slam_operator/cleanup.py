"""Deleting a resource's checkpoint objects (checkpoint.deleteOnCleanup), with the MinIO client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from slam.checkpoint.format import slot_dir
from slam_operator.kube import Kube
from slam_operator.spec import CheckpointSpec


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
