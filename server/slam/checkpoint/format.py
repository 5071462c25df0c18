"""On-store format of a request checkpoint: object names, safetensors payloads, the JSON manifest.

Layout under `<prefix>/<slot>/<epoch>/`: a slot is one replica's place in the store, an epoch one pod's
tenure of it (the operator raises the epoch at every failover, design.md section 3):

    .epoch.json                          the claim: written once the epoch holds everything it took over;
                                         restores and owner lookups read only the highest claimed epoch
    <request_id>/                        one directory per request in flight

A pod cut off from the cluster that keeps writing its older epoch is thus ignored by everyone else, even when its
objects are newer in time.

and in each request directory:

    prompt.safetensors                   prompt ids, written once per request (never changes)
    reserve/seg-<first>-<last>.safetensors  reserve-tier tokens [first, last] of every layer, written once
    v<version:08d>/tokens.safetensors    generated ids and the sampling RNG state
    v<version:08d>/state.safetensors     the active compressed cache (absent before the first forward pass)
    v<version:08d>/manifest.json         written last: a version without it does not exist
    finished.json                        once the request finished, in place of everything above: its
                                         owner's URL, kept while the owner keeps the finished stream

Tokens live apart from the cache so that a corrupt cache still leaves a re-prefill from tokens, and the prompt lives
apart from the versions so that a bounded policy's per-version state is bounded too. Every manifest names the
objects it needs (paths relative to the request directory) with size and sha256, and carries a checksum of itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

# The object names are torch-free (the operator needs them too); callers read them through this module.
from slam.checkpoint.layout import (  # noqa: F401
    EPOCH_MARKER,
    FINISHED,
    MANIFEST,
    dir_number,
    epoch_dir,
    request_dir,
    root_dir,
    segment_name,
    slot_dir,
    version_dir,
)

FORMAT_VERSION = 1

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def object_entry(name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "size": len(data), "sha256": sha256(data)}


# --- tensors -----------------------------------------------------------------------------------------
def pack_layers(name: str, tensors: list[torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Stack per-layer tensors into one `name` tensor [layers, ...] when shapes agree, else `name.<i>`."""
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        out[name] = torch.stack([t.detach().cpu() for t in tensors]).contiguous()
    else:
        for i, t in enumerate(tensors):
            out[f"{name}.{i}"] = t.detach().cpu().contiguous()


def unpack_layers(name: str, tensors: dict[str, torch.Tensor], layers: int) -> list[torch.Tensor]:
    if name in tensors:
        stacked = tensors[name]
        if stacked.shape[0] != layers:
            raise ValueError(f"{name}: {stacked.shape[0]} layers stored, model has {layers}")
        return list(stacked.unbind(0))
    try:
        return [tensors[f"{name}.{i}"] for i in range(layers)]
    except KeyError as e:
        raise ValueError(f"{name}: layer {e} missing") from e


def save(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()})


def load(data: bytes) -> dict[str, torch.Tensor]:
    return st_load(data)


# --- INT8 for the reserve tier (optional, lossy) ----------------------------------------------------
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token, per-head INT8. x: [..., head_dim] -> (q int8 [..., head_dim], scale fp32 [...])."""
    scale = x.float().abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: any scale works
    q = torch.round(x.float() / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


# --- manifest ----------------------------------------------------------------------------------------
def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def encode_manifest(body: dict[str, Any]) -> bytes:
    body = {k: v for k, v in body.items() if k != "checksum"}
    body["format"] = FORMAT_VERSION
    return json.dumps({**body, "checksum": sha256(_canonical(body))}, sort_keys=True, indent=1).encode()


def decode_manifest(data: bytes) -> dict[str, Any]:
    """Parse and self-check a manifest; raises ValueError when it is not one we wrote intact."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"manifest is not JSON: {e}") from e
    if not isinstance(body, dict) or "checksum" not in body:
        raise ValueError("manifest has no checksum")
    checksum = body.pop("checksum")
    if sha256(_canonical(body)) != checksum:
        raise ValueError("manifest checksum mismatch")
    if body.get("format") != FORMAT_VERSION:
        raise ValueError(f"manifest format {body.get('format')} is not {FORMAT_VERSION}")
    return body
