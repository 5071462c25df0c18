"""Names of checkpoint objects in the store (the layout is described in format.py). No torch here: the
operator, which runs without it, finds and deletes a resource's checkpoints by these names."""

from __future__ import annotations

MANIFEST = "manifest.json"
EPOCH_MARKER = ".epoch.json"  # a leading dot: no request id can collide with it
# What stays of a finished request's directory while its owner still holds the finished stream: the owner's
# URL, so that a client reconnecting to another replica is still forwarded to it.
FINISHED = "finished.json"


def request_dir(prefix: str, slot: int, request_id: str, epoch: int = 0) -> str:
    if not request_id or "/" in request_id or request_id.startswith("."):
        raise ValueError(f"request id {request_id!r} cannot name a checkpoint directory")
    return epoch_dir(prefix, slot, epoch) + request_id + "/"


def root_dir(prefix: str) -> str:
    """The directory that holds the slots ("" for an empty prefix: the bucket's top)."""
    return prefix.strip("/") + "/" if prefix.strip("/") else ""


def slot_dir(prefix: str, slot: int) -> str:
    return f"{root_dir(prefix)}{slot}/"


def epoch_dir(prefix: str, slot: int, epoch: int) -> str:
    return f"{slot_dir(prefix, slot)}{epoch}/"


def dir_number(name: str) -> int | None:
    """The slot or epoch a listed directory (`.../<number>/`) stands for; None for any other name."""
    last = name.rstrip("/").rpartition("/")[2]
    return int(last) if last.isascii() and last.isdigit() else None


def version_dir(version: int) -> str:
    return f"v{version:08d}/"


def segment_name(first: int, last: int) -> str:
    return f"reserve/seg-{first:08d}-{last:08d}.safetensors"
