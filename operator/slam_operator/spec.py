"""The SLAMInference spec as a pydantic model, with the CRD's defaults and checks.

A real API server defaults and validates objects with the CRD schema before the operator sees them, but
the operator must not depend on that (kmock's emulator, an older CRD, or a schema bypassed by a client all
hand over raw specs), so every default and rule of the schema is repeated here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

EMBEDDED = "embedded"  # model.source for the model shipped in the image


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    source: str = Field(default=EMBEDDED, min_length=1)
    # auto: int8 weights on a pod without a GPU, float32 on GPUs, as `slam serve` decides.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    pvcName: str | None = None


class CacheSpec(_Spec):
    policy: Literal["full", "streaming", "slam", "snapkv", "h2o"] = "slam"
    budget: int = Field(default=256, ge=1)
    sink: int = Field(default=4, ge=0)
    recent: int = Field(default=64, ge=1)
    reserveDevice: Literal["auto", "cuda", "cpu"] = "auto"
    reserveDtype: Literal["auto", "bfloat16", "int8"] = "auto"

    @model_validator(mode="after")
    def _budget(self) -> CacheSpec:
        if self.policy != "full" and self.budget <= self.sink + self.recent:
            raise ValueError(f"cache.budget ({self.budget}) must be larger than cache.sink + cache.recent "
                             f"({self.sink} + {self.recent}) unless cache.policy is full")
        return self


class CredentialsRef(_Spec):
    name: str = Field(min_length=1)
    accessKeyKey: str = "accessKey"
    secretKeyKey: str = "secretKey"


class CheckpointSpec(_Spec):
    enabled: bool = True
    endpoint: str | None = Field(default=None, pattern=r"^[^:/\s]+:[0-9]{1,5}$")
    bucket: str | None = None
    prefix: str = "checkpoints"
    secure: bool = False
    intervalTokens: int = Field(default=16, ge=1)
    secretRef: CredentialsRef | None = None
    maxAgeSeconds: int = Field(default=86400, ge=60)
    deleteOnCleanup: bool = False

    @model_validator(mode="after")
    def _store(self) -> CheckpointSpec:
        if self.enabled and not self.bucket:
            raise ValueError("checkpoint.bucket is required when checkpoint.enabled is true")
        if self.enabled and not self.endpoint:
            raise ValueError("checkpoint.endpoint is required when checkpoint.enabled is true")
        return self


class ApiKeyRef(_Spec):
    name: str = Field(min_length=1)
    key: str = "apiKey"


class ServerSpec(_Spec):
    port: int = Field(default=8000, ge=1, le=65535)
    maxBatch: int = Field(default=8, ge=1)
    maxQueue: int = Field(default=64, ge=0)
    asyncScheduling: Literal["auto", "on", "off"] = "auto"
    enforceEager: StrictBool = False  # as the schema: "yes" is not a boolean
    apiKeySecretRef: ApiKeyRef | None = None


class ResourcesSpec(_Spec):
    gpus: int = Field(default=0, ge=0)
    cpu: str | int | None = None
    memory: str | int | None = None


class SLAMInferenceSpec(_Spec):
    image: str = Field(default="slam-serve:cpu", min_length=1)
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    model: ModelSpec = ModelSpec()
    replicas: int = Field(default=1, ge=0, le=1024)
    cache: CacheSpec = CacheSpec()
    # Leaving the section out turns checkpointing off; writing one turns it on unless enabled is false.
    checkpoint: CheckpointSpec = CheckpointSpec(enabled=False)
    server: ServerSpec = ServerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    nodeSelector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    nodeFailureGraceSeconds: int = Field(default=60, ge=0)


class SpecError(ValueError):
    """A spec the operator cannot act on; the message names the fields."""


def parse_spec(raw: Any) -> SLAMInferenceSpec:
    """The spec with defaults filled in, or SpecError naming every bad field (`spec.cache.budget: ...`)."""
    try:
        return SLAMInferenceSpec.model_validate(dict(raw or {}))
    except ValidationError as e:
        raise SpecError(explain(e)) from None


def explain(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        path = ".".join(str(x) for x in ("spec", *e["loc"]))
        message = str(e["msg"]).removeprefix("Value error, ")
        parts.append(message if message.startswith(("cache.", "checkpoint.")) else f"{path}: {message}")
    return "; ".join(parts)
