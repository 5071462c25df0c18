"""Validated configuration shared by the CLI, the engine, the server and the operator's pod template.

Every setting lives here once. `ServerSettings` reads `SLAM_*` environment variables, so the operator can
configure a pod with environment variables and a user can do the same with flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    max_batch: int = Field(default=8, ge=1)
    prefill_chunk: int = Field(default=512, ge=1)
    max_prompt_tokens: int = Field(default=32768, ge=1)
    cache: CacheConfig = Field(default_factory=CacheConfig)


class ServerSettings(BaseSettings):
    """Everything `slam serve` takes; each field is also the environment variable `SLAM_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="SLAM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model: str | None = None
    served_model_name: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
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
    api_key_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        self.cache_config()  # raises on an inconsistent cache setting
        if self.api_key_file is not None and not self.api_key_file.is_file():
            raise ValueError(f"api key file {self.api_key_file} does not exist")
        return self

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
        )
