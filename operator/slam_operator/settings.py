"""The server's environment, rendered from `slam.config.ServerSettings` (the class `slam serve` reads).

The operator builds a `ServerSettings` from the spec, which validates it, and emits `SLAM_<FIELD>` for each
field it set: there is no second list of flag names to drift from the server's.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from slam.config import ServerSettings

from slam_operator.spec import EMBEDDED, SLAMInferenceSpec, SpecError

ENV_PREFIX = ServerSettings.model_config["env_prefix"]
API_KEY_DIR = "/etc/slam/api-key"  # where the API key Secret is mounted
MODELS_DIR = "/models"  # where model.pvcName is mounted


def env_name(field: str) -> str:
    assert field in ServerSettings.model_fields, field
    return f"{ENV_PREFIX}{field.upper()}"


def pod_domain(name: str, namespace: str) -> str:
    """The headless Service's domain: each pod is `<name>-<slot>.<this>`."""
    return f"{name}-pods.{namespace}.svc.cluster.local"


def advertise_url(name: str, namespace: str, slot: int, port: int) -> str:
    return f"http://{name}-{slot}.{pod_domain(name, namespace)}:{port}"


def server_settings(spec: SLAMInferenceSpec, name: str, namespace: str, slot: int, epoch: int) -> ServerSettings:
    """The settings of the server in `slot` at `epoch`, validated by the server's own class.

    S3 credentials and the API key file stay out: they come from Secrets inside the pod (env valueFrom and a
    mounted file), and `api_key_file` is checked to exist, which only holds inside the pod.
    """
    values: dict[str, Any] = dict(
        host="0.0.0.0", port=spec.server.port, dtype=spec.model.dtype,
        policy=spec.cache.policy, budget=spec.cache.budget, sink=spec.cache.sink, recent=spec.cache.recent,
        reserve_device=spec.cache.reserveDevice, reserve_dtype=spec.cache.reserveDtype,
        max_batch=spec.server.maxBatch, max_queue=spec.server.maxQueue,
        async_scheduling=spec.server.asyncScheduling, enforce_eager=spec.server.enforceEager,
        slot=slot, slot_epoch=epoch, advertise_url=advertise_url(name, namespace, slot, spec.server.port),
    )
    if spec.model.source != EMBEDDED:
        values["model"] = spec.model.source
    ckpt = spec.checkpoint
    if ckpt.enabled:
        values.update(s3_endpoint=ckpt.endpoint, s3_bucket=ckpt.bucket, s3_prefix=ckpt.prefix,
                      s3_secure=ckpt.secure, checkpoint_interval=ckpt.intervalTokens,
                      checkpoint_max_age=ckpt.maxAgeSeconds)
        if epoch > 0:  # every pod after a slot's first resumes what its predecessor checkpointed
            values["restore_slot"] = slot
    try:
        # model_validate, not the constructor: BaseSettings' constructor would also read this process's SLAM_*.
        return ServerSettings.model_validate(values)
    except ValidationError as e:
        problems = (f"{'.'.join(map(str, x['loc'])) or 'spec'}: {x['msg']}" for x in e.errors())
        raise SpecError("; ".join(problems)) from None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def server_env(spec: SLAMInferenceSpec, settings: ServerSettings) -> list[dict[str, Any]]:
    """Container env: one `SLAM_<FIELD>` per field set, plus the Secret-backed credentials and API key."""
    dumped = settings.model_dump(mode="json", include=settings.model_fields_set)
    env = [{"name": env_name(field), "value": _text(value)} for field, value in sorted(dumped.items())
           if value is not None]
    ref = spec.checkpoint.secretRef
    if spec.checkpoint.enabled and ref is not None:
        for field, key in (("s3_access_key", ref.accessKeyKey), ("s3_secret_key", ref.secretKeyKey)):
            env.append({"name": env_name(field), "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}})
    if spec.server.apiKeySecretRef is not None:
        env.append({"name": env_name("api_key_file"), "value": f"{API_KEY_DIR}/{spec.server.apiKeySecretRef.key}"})
    return env
