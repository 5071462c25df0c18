"""Validated configuration shared by the CLI, the engine, the server and the operator's pod template.

Every setting lives here once. `ServerSettings` reads `SLAM_*` environment variables, so the operator can
configure a pod with environment variables and a user can do the same with flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PositionMode = Literal["original", "cache"]


class CacheConfig(BaseModel):
    """How one request's KV cache is compressed.

    `budget` bounds the tokens kept per layer and KV head in the active cache (None: unbounded, only
    for `full`). `position_mode="cache"` stores keys before rotation and numbers positions inside the
    cache, which lets generation run past the model's trained context length.
    """

    model_config = {"extra": "forbid"}

    policy: str = "slam"
    budget: int | None = Field(default=256, ge=1)
    sink: int = Field(default=4, ge=0)
    recent: int = Field(default=64, ge=1)
    position_mode: PositionMode = "original"

    @model_validator(mode="after")
    def _check(self) -> CacheConfig:
        from slam.cache import POLICIES

        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(sorted(POLICIES))}")
        if self.policy != "full":
            if self.budget is None:
                raise ValueError(f"policy {self.policy!r} needs a budget")
            if self.budget < self.sink + self.recent:
                raise ValueError(
                    f"budget ({self.budget}) must be at least sink + recent ({self.sink} + {self.recent})"
                )
        return self

    @property
    def bounded(self) -> bool:
        return self.policy != "full"


class EngineConfig(BaseModel):
    """Settings of the decoding engine, independent of HTTP."""

    model_config = {"extra": "forbid"}

    model: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "int8"] = "float32"
    device: str = "auto"
    max_batch: int = Field(default=8, ge=1)
    prefill_chunk: int = Field(default=512, ge=1)
    max_prompt_tokens: int = Field(default=32768, ge=1)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    # Pool columns per slot (the largest budget a request may ask for); None: the cache's budget, or
    # max_model_len for `full`.
    max_budget: int | None = Field(default=None, ge=2)
    max_model_len: int | None = Field(default=None, ge=2)  # None: the model's trained length
    # Where the `slam` policy keeps evicted tokens: "auto" picks the measured default of the device.
    reserve_device: Literal["auto", "cuda", "cpu"] = "auto"
    reserve_dtype: Literal["bfloat16", "int8"] = "bfloat16"
    enforce_eager: bool = False  # no CUDA graphs for decode steps


class ServerSettings(BaseSettings):
    """Everything `slam serve` takes; each field is also the environment variable `SLAM_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="SLAM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model: str | None = None
    served_model_name: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "int8"] = "float32"
    device: str = "auto"
    policy: str = "slam"
    budget: int = Field(default=256, ge=1)
    sink: int = Field(default=4, ge=0)
    recent: int = Field(default=64, ge=1)
    position_mode: PositionMode = "original"
    max_batch: int = Field(default=8, ge=1)
    max_queue: int = Field(default=64, ge=0)
    prefill_chunk: int = Field(default=512, ge=1)
    max_prompt_tokens: int = Field(default=32768, ge=1)
    reserve_device: Literal["auto", "cuda", "cpu"] = "auto"
    reserve_dtype: Literal["bfloat16", "int8"] = "bfloat16"
    enforce_eager: bool = False
    api_key_file: Path | None = None
    # Checkpoints (design.md section 3). No endpoint: checkpointing is off.
    s3_endpoint: str | None = None  # host:port, no scheme
    s3_bucket: str = "slam"
    s3_prefix: str = "checkpoints"
    s3_secure: bool = False
    # Credentials only from the environment (SLAM_S3_ACCESS_KEY / SLAM_S3_SECRET_KEY): never flags, which
    # show up in `ps`; SecretStr keeps them out of reprs and logs.
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    slot: int = Field(default=0, ge=0)
    # Fencing: the operator bumps a slot's epoch at every failover; checkpoints live under <slot>/<epoch>/.
    slot_epoch: int = Field(default=0, ge=0)
    advertise_url: str | None = None  # default http://<host>:<port>
    checkpoint_interval: int = Field(default=16, ge=1)
    restore_slot: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        self.cache_config()  # raises on an inconsistent cache setting
        if self.api_key_file is not None and not self.api_key_file.is_file():
            raise ValueError(f"api key file {self.api_key_file} does not exist")
        if self.restore_slot is not None and not self.s3_endpoint:
            raise ValueError("--restore-slot needs --s3-endpoint")
        self.checkpoint_config()  # the checkpoint library validates its own fields
        return self

    @property
    def public_url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"

    def checkpoint_config(self):  # -> CheckpointConfig | None (imported lazily: minio is a serving dependency)
        """The checkpoint library's config built from these settings (one source of truth); None when off."""
        if not self.s3_endpoint:
            return None
        from slam.checkpoint.store import CheckpointConfig

        return CheckpointConfig(
            endpoint=self.s3_endpoint, bucket=self.s3_bucket, prefix=self.s3_prefix, secure=self.s3_secure,
            access_key=self.s3_access_key, secret_key=self.s3_secret_key, slot=self.slot,
            epoch=self.slot_epoch, advertise_url=self.public_url, interval_tokens=self.checkpoint_interval,
        )

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            policy=self.policy,
            budget=None if self.policy == "full" else self.budget,
            sink=self.sink,
            recent=self.recent,
            position_mode=self.position_mode,
        )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            max_batch=self.max_batch,
            prefill_chunk=self.prefill_chunk,
            max_prompt_tokens=self.max_prompt_tokens,
            cache=self.cache_config(),
            reserve_device=self.reserve_device,
            reserve_dtype=self.reserve_dtype,
            enforce_eager=self.enforce_eager,
        )
