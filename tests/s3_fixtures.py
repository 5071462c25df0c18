"""An S3 endpoint for tests: moto's ThreadedMotoServer on a free loopback port, or the endpoint in
SLAM_TEST_S3_ENDPOINT (+ SLAM_TEST_S3_ACCESS_KEY / SLAM_TEST_S3_SECRET_KEY), e.g. a real MinIO."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from slam.checkpoint.store import CheckpointConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """A moto S3 server that can be stopped and started again on the same port (its data survives:
    moto keeps it in process memory)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.server = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def make_config(endpoint: str, access: str, secret: str, **overrides) -> CheckpointConfig:
    # A fresh prefix per config keeps tests apart on a shared external endpoint.
    defaults = dict(
        endpoint=endpoint,
        bucket="slam-test",
        prefix=f"test-{uuid.uuid4().hex[:8]}",
        access_key=SecretStr(access),
        secret_key=SecretStr(secret),
        backoff_s=0.05,
        backoff_max_s=0.5,
        timeout_s=5.0,
    )
    return CheckpointConfig(**{**defaults, **overrides})


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[tuple[str, str, str]]:
    """(endpoint, access key, secret key) of the S3 store the tests use."""
    external = os.environ.get("SLAM_TEST_S3_ENDPOINT")
    if external:
        yield (
            external,
            os.environ.get("SLAM_TEST_S3_ACCESS_KEY", ""),
            os.environ.get("SLAM_TEST_S3_SECRET_KEY", ""),
        )
        return
    server = MotoS3()
    server.start()
    try:
        yield server.endpoint, "testing", "testing"
    finally:
        server.stop()
