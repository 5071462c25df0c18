"""Garbage collection of this replica's checkpoint slot, by the server that owns the slot.

Left behind in a slot, over time: checkpoints of requests nobody resumed here (a restore that failed, an
abort whose delete did not reach the store during an outage, a fenced-off older pod's writes), orphaned
versions (uploads cut off before their manifest), checkpoints that have not been refreshed for
`--checkpoint-max-age`, and finished requests' records once their streams are no longer kept. Only the store's public list/get/delete are used, and a request's directory is
found from the names of its objects, so the collector does not depend on how slots are laid out inside.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from slam.api.streams import RETENTION_S
from slam.checkpoint import ObjectStore
from slam.checkpoint import format as fmt
from slam.config import ServerSettings

log = logging.getLogger("slam.api")
VERSION = re.compile(r"v(\d{8})")
LEAVES = {"prompt.safetensors", "reserve", fmt.FINISHED}
UPLOAD_GRACE_S = 120.0  # a version without manifest younger than this may still be uploading


@dataclass
class RequestObjects:
    root: str  # ".../<request id>/"
    versions: dict[int, list[str]] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def manifests(self) -> dict[int, str]:
        return {v: n for v, names in self.versions.items() for n in names if n.endswith("/" + fmt.MANIFEST)}

    def names(self) -> list[str]:
        return self.other + [n for names in self.versions.values() for n in names]


def group(names: list[str]) -> dict[str, RequestObjects]:
    """Objects by request directory: the path before the first version, prompt or reserve component."""
    found: dict[str, RequestObjects] = {}
    for name in names:
        parts = name.split("/")
        at = next((i for i, p in enumerate(parts[:-1]) if VERSION.fullmatch(p)), None)
        if at is None:
            at = next((i for i, p in enumerate(parts) if p in LEAVES), None)
        if not at:
            continue
        root = "/".join(parts[:at]) + "/"
        req = found.setdefault(root, RequestObjects(root))
        if VERSION.fullmatch(parts[at]) and at < len(parts) - 1:
            req.versions.setdefault(int(parts[at][1:]), []).append(name)
        else:
            req.other.append(name)
    return found


def slot_objects(store: ObjectStore, slot: int, epoch: int | None = None) -> list[str]:
    """Objects of `slot`, only of epochs up to `epoch` when given: a fenced-off older pod, which still runs
    its collector, must never take a newer epoch's requests (none of them is live in it) for garbage."""
    base = fmt.slot_dir(store.config.prefix, slot)
    if epoch is None:
        return store.list(base)
    return [n for d in store.list_dirs(base) if (e := fmt.dir_number(d)) is not None and e <= epoch
            for n in store.list(d)]


def collect(store: ObjectStore, slot: int, live: set[str], max_age_s: float, orphan_grace_s: float,
            now: float | None = None, epoch: int | None = None, finished_keep_s: float = RETENTION_S
            ) -> dict[str, int]:
    """One pass over `slot` (its epochs up to `epoch`). Returns counts of what was deleted. A finished
    request's record goes once its owner no longer keeps the stream (`finished_keep_s`, the buffers'
    retention), with whatever a cut-off delete left beside it."""
    now = time.time() if now is None else now
    counts = {"requests": 0, "versions": 0, "finished": 0, "objects": 0}
    for req in group(slot_objects(store, slot, epoch)).values():
        record = next((n for n in req.other if n.endswith("/" + fmt.FINISHED)), None)
        if record is not None:
            done = _stamp(store, record, "finished_unix")
            if done is None or now - done > finished_keep_s:
                counts["objects"] += _delete(store, req.names())
                counts["finished"] += 1
            continue
        manifests = req.manifests()
        newest = _stamp(store, manifests[max(manifests)], "created_unix") if manifests else None
        age = now - newest if newest is not None else None
        nobody = req.request_id not in live and (age is None or age > orphan_grace_s)
        if nobody or (age is not None and age > max_age_s):
            counts["objects"] += _delete(store, req.names())
            counts["requests"] += 1
            continue
        complete = max(manifests, default=-1)
        for version, names in req.versions.items():
            if version < complete and version not in manifests:  # cut off before its manifest, superseded
                counts["objects"] += _delete(store, names)
                counts["versions"] += 1
    return counts


def _stamp(store: ObjectStore, name: str, key: str) -> float | None:
    """The time `key` of a manifest or record; None when unreadable (a manifest's age is then unknown, so it
    is never "too old"; a record that cannot be read names no owner, so it goes)."""
    try:
        return float(fmt.decode_manifest(store.get(name)).get(key, 0))
    except Exception as exc:
        log.warning("checkpoint collector cannot read %s: %s", name, exc)
        return None


def _delete(store: ObjectStore, names: list[str]) -> int:
    for name in names:
        store.delete(name)
    return len(names)


def live_ids(engine) -> set[str]:
    """Requests the engine holds."""
    with engine.lock:
        return {s.request_id for s in list(engine.scheduler.running) + list(engine.scheduler.waiting)}


class Janitor:
    """Runs `collect` over this replica's slot every `interval_s`, on its own daemon thread."""

    def __init__(self, store: ObjectStore, settings: ServerSettings, live: Callable[[], set[str]]):
        self.store, self.slot, self.epoch, self.live = store, settings.slot, settings.slot_epoch, live
        self.max_age_s = float(settings.checkpoint_max_age)
        self.orphan_grace_s = max(UPLOAD_GRACE_S, settings.resume_grace_s)
        self.interval_s = min(300.0, self.max_age_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slam-janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                counts = collect(self.store, self.slot, self.live(), self.max_age_s, self.orphan_grace_s,
                                 epoch=self.epoch)
                if counts["objects"]:
                    log.warning("checkpoint collector removed %s from slot %d", counts, self.slot)
            except Exception as exc:  # the store is down: try again at the next interval
                log.warning("checkpoint collector failed: %s", exc)
