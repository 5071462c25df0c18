"""S3 object store (MinIO client) for checkpoints: put/get/list/delete with retries and backoff."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import MinioException, S3Error
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_PART = 5 * 1024 * 1024
MAX_PART = 5 * 1024 * 1024 * 1024
MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}


class CheckpointConfig(BaseSettings):
    """Where and how often checkpoints go. Credentials come from SLAM_S3_ACCESS_KEY / SLAM_S3_SECRET_KEY
    and are SecretStr, so they never appear in repr, logs or model_dump_json."""

    model_config = SettingsConfigDict(env_prefix="SLAM_CHECKPOINT_", extra="ignore", populate_by_name=True)

    endpoint: str = "127.0.0.1:9000"  # host:port, no scheme
    bucket: str = "slam-checkpoints"
    prefix: str = "slam"
    secure: bool = False
    region: str = "us-east-1"
    access_key: SecretStr = Field(default=SecretStr(""), validation_alias="SLAM_S3_ACCESS_KEY")
    secret_key: SecretStr = Field(default=SecretStr(""), validation_alias="SLAM_S3_SECRET_KEY")
    slot: int = Field(default=0, ge=0)
    epoch: int = Field(default=0, ge=0)  # fencing: this pod's tenure of the slot; objects go under <slot>/<epoch>/
    advertise_url: str = ""
    interval_tokens: int = Field(default=16, ge=1)
    retention: int = Field(default=2, ge=1)  # complete versions kept per request
    include_reserve: bool = True  # False: a restored slam request recalls only tokens evicted after restore
    reserve_int8: bool = False  # True: 4x smaller reserve segments, but restored outputs may differ
    queue_size: int = Field(default=8, ge=1)  # pending snapshots (each holds a copy of an active cache)
    retries: int = Field(default=3, ge=1)  # attempts per store operation
    backoff_s: float = Field(default=0.2, gt=0)  # first retry delay, doubled per attempt
    backoff_max_s: float = Field(default=10.0, gt=0)  # ceiling of the checkpointer's re-upload delay
    timeout_s: float = Field(default=10.0, gt=0)  # connect and read timeout of one HTTP request


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
