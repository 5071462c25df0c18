"""S3 object store (MinIO client) for checkpoints: put/get/list/delete with retries and backoff."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import MinioException, S3Error

from slam.config import CheckpointConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_PART = 5 * 1024 * 1024
MAX_PART = 5 * 1024 * 1024 * 1024
MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}


class ObjectMissing(KeyError):
    """The object (or its bucket) does not exist."""


class StoreError(RuntimeError):
    """The store failed after all retries."""


class ObjectStore:
    def __init__(self, config: CheckpointConfig):
        self.config = config
        # No urllib3-level retries: they would hide outages for tens of seconds; `_retry` decides instead.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=config.timeout_s, read=config.timeout_s),
            retries=False,
            maxsize=4,
        )
        self._http = http
        self.client = Minio(
            config.endpoint,
            access_key=config.access_key.get_secret_value() or None,
            secret_key=config.secret_key.get_secret_value() or None,
            secure=config.secure,
            region=config.region,
            http_client=http,
        )
        self.bucket = config.bucket
        self._bucket_ready = False

    def __repr__(self) -> str:
        return f"ObjectStore(endpoint={self.config.endpoint!r}, bucket={self.bucket!r})"

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        delay = self.config.backoff_s
        for attempt in range(1, self.config.retries + 1):
            try:
                return fn()
            except S3Error as e:
                if e.code in MISSING_CODES:
                    raise ObjectMissing(what) from e
                err: Exception = e
            except (MinioException, urllib3.exceptions.HTTPError, OSError) as e:  # 5xx without S3 XML, network
                err = e
            if attempt == self.config.retries:
                raise StoreError(f"{what}: {type(err).__name__}: {err}") from err
            log.debug("store %s failed (attempt %d): %s; retrying in %.2fs", what, attempt, err, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def ensure_bucket(self) -> None:
        if self._bucket_ready:
            return

        def make() -> None:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as e:  # another replica created it first
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        self._retry(f"create bucket {self.bucket}", make)
        self._bucket_ready = True

    def put(self, name: str, data: bytes) -> None:
        self.ensure_bucket()
        # One part whatever the size: a single PUT is atomic, a multipart upload is not needed at these sizes.
        part = min(max(len(data), MIN_PART), MAX_PART)
        try:
            self._retry(
                f"put {name}",
                lambda: self.client.put_object(self.bucket, name, io.BytesIO(data), len(data), part_size=part),
            )
        except ObjectMissing:  # the bucket vanished (e.g. a reset store): create it again, once
            self._bucket_ready = False
            self.ensure_bucket()
            self._retry(
                f"put {name}",
                lambda: self.client.put_object(self.bucket, name, io.BytesIO(data), len(data), part_size=part),
            )

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Store `data` at `name` only if nothing is there: an S3 conditional write (If-None-Match: *,
        honoured by MinIO, AWS S3 and moto). False when an object exists. The minio client sends no such
        header on puts, so this one goes to a presigned URL (the header is not part of its signature)."""
        self.ensure_bucket()
        url = self.client.presigned_put_object(self.bucket, name, expires=timedelta(minutes=5))

        def attempt() -> bool:
            resp = self._http.request("PUT", url, body=data, headers={"If-None-Match": "*"})
            if resp.status in (200, 412):
                return resp.status == 200
            raise OSError(f"HTTP {resp.status}: {resp.data[:200]!r}")

        return self._retry(f"conditional put {name}", attempt)

    def get(self, name: str) -> bytes:
        def fetch() -> bytes:
            resp = self.client.get_object(self.bucket, name)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._retry(f"get {name}", fetch)

    def list(self, prefix: str) -> list[str]:
        """Names of all objects under `prefix` (recursive); empty when the bucket does not exist."""
        try:
            return self._retry(
                f"list {prefix}",
                lambda: [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)],
            )
        except ObjectMissing:
            return []

    def list_dirs(self, prefix: str) -> list[str]:
        """The "directories" one level below `prefix` (names ending in "/"); empty without the bucket."""
        try:
            return self._retry(
                f"list {prefix}",
                lambda: [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix) if o.is_dir],
            )
        except ObjectMissing:
            return []

    def copy(self, source: str, name: str) -> None:
        """Server-side copy: the bytes never pass through this process (reserve segments can be large)."""
        self._retry(f"copy {source} to {name}", lambda: self.client.copy_object(
            self.bucket, name, CopySource(self.bucket, source)))

    def delete(self, name: str) -> None:
        try:
            self._retry(f"delete {name}", lambda: self.client.remove_object(self.bucket, name))
        except ObjectMissing:
            pass

    def delete_prefix(self, prefix: str) -> int:
        names = self.list(prefix)
        for name in names:
            self.delete(name)
        return len(names)
