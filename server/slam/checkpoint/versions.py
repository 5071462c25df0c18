"""One request's versions in the store: what is stored (Tracker), each version's manifest, and retention."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from slam.checkpoint import format as fmt
from slam.checkpoint.snapshot import Snapshot
from slam.checkpoint.store import CheckpointConfig, ObjectStore

log = logging.getLogger(__name__)


@dataclass
class Tracker:
    """What the store holds for one request (written by the worker; `stored` is read by snapshots)."""

    version: int = 0  # highest version number used; a retry of a failed version reuses version + 1
    versions: list[int] = field(default_factory=list)  # complete versions in the store, oldest first
    prompt: dict | None = None  # entry of prompt.safetensors once uploaded
    segments: list[dict] = field(default_factory=list)  # reserve segments uploaded, in order
    stored: list[int] | None = None  # reserve tokens uploaded per layer
    last_tokens: int = -1  # output tokens at the last snapshot (-1: none yet)


def manifest_body(snap: Snapshot, version: int, objects: dict, config: CheckpointConfig) -> dict[str, Any]:
    """The manifest of one version of a request: what a restore needs besides the objects it names."""
    reserve = None
    if snap.reserve is not None:
        reserve = {
            "int8": config.reserve_int8,
            "n": [r.n for r in snap.reserve],
            "shared_k_score": snap.reserve[0].k_score is None,
        }
    return {
        "request_id": snap.request_id,
        "version": version,
        "slot": config.slot,
        "epoch": config.epoch,
        "owner_url": config.advertise_url,
        "created_unix": time.time(),
        "counts": {
            "prompt_tokens": len(snap.prompt_ids),
            "output_tokens": len(snap.output_ids),
            "num_cached": snap.num_cached,
            "cache_tokens": [layer.k.shape[1] for layer in snap.layers] if snap.layers else [],
        },
        "sampling": snap.sampling,
        "cache_config": snap.cache_config,
        "detok": {
            "output_text": snap.output_text,
            "prefix_offset": snap.prefix_offset,
            "read_offset": snap.read_offset,
        },
        "replacements": snap.replacements,
        "reserve_next_pos": snap.reserve_next_pos,
        "reserve": reserve,
        "objects": objects,
    }


def apply_retention(store: ObjectStore, retention: int, root: str, tr: Tracker) -> None:
    """Delete the oldest complete versions of the request under `root` beyond `retention`."""
    while len(tr.versions) > retention:
        old = fmt.version_dir(tr.versions[0])
        try:
            # Manifest first: a half-deleted version must never look complete.
            for name in (fmt.MANIFEST, "state.safetensors", "tokens.safetensors"):
                store.delete(root + old + name)
        except Exception as e:  # retried after the next version
            log.warning("retention delete of %s%s failed: %s", root, old, e)
            return
        tr.versions.pop(0)
