"""Background checkpoint uploads: the decode loop snapshots, one worker thread serializes and uploads.

The decode thread only copies tensors (`take_snapshot`) and enqueues; it never waits on the store. The
queue holds at most `queue_size` snapshots and at most one per request (a newer snapshot replaces a
pending older one: the older is obsolete), so memory stays bounded whatever the store does. When the
store is down, uploads fail, are counted, and the request's latest snapshot is retried with exponential
backoff; reserve tokens not yet stored are always part of the next snapshot, so dropping any pending
snapshot loses nothing but recency.

Objects go under the slot's epoch (format.py). The epoch counts once its claim marker is stored: a fresh
checkpointer claims it before its first upload; a restoring server claims it only after the restored
requests are stored at the new epoch (`Checkpointer(claim=False)`, then `claim`), so a pod that dies
half-way through a restore leaves the epoch below it in charge.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from slam.checkpoint import format as fmt
from slam.checkpoint.snapshot import Snapshot, encode_prompt, encode_segment, encode_state, encode_tokens, take_snapshot
from slam.checkpoint.store import CheckpointConfig, ObjectStore
from slam.checkpoint.versions import Tracker, apply_retention, manifest_body
from slam.engine.sequence import Sequence

log = logging.getLogger(__name__)
CLAIM = fmt.EPOCH_MARKER  # the claim's key in the queue: no request id starts with a dot


@dataclass
class _Item:
    kind: str  # "upload" | "delete" | "claim"
    snap: Snapshot | None = None
    body: dict | None = None  # the claim's marker, or a finished request's record
    not_before: float = 0.0
    attempts: int = 0


class Checkpointer:
    def __init__(self, store: ObjectStore, config: CheckpointConfig, registry: Any | None = None,
                 claim: bool = True):
        self.store, self.config = store, config
        self._trackers: dict[str, Tracker] = {}
        self._pending: collections.OrderedDict[str, _Item] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self.claimed = False  # the epoch's marker is stored
        # This process's mark in the claim: another pod started for the same slot and epoch loses the
        # conditional write of the marker, and is then fenced: it writes nothing more.
        self.instance = uuid.uuid4().hex
        self.fenced: str | None = None  # why, once fenced
        # Counters for the server's metrics; read them or register callbacks.
        self.uploads_total = 0
        self.bytes_total = 0
        self.failures_total = 0
        self.coalesced_total = 0  # pending snapshots replaced by a newer one of the same request
        self.dropped_total = 0  # pending snapshots dropped because the queue was full
        self.durations: collections.deque[float] = collections.deque(maxlen=1024)  # seconds per checkpoint
        self.last_upload: dict[str, dict[str, int]] = {}  # request id -> bytes per object kind, last version
        self.on_upload: list[Callable[[float, int], None]] = []  # (seconds, bytes) per checkpoint
        self.on_failure: list[Callable[[], None]] = []
        if registry is not None:
            self._register(registry)
        if claim:
            self.claim()
        self._thread = threading.Thread(target=self._run, name="slam-checkpoint", daemon=True)
        self._thread.start()

    def root(self, request_id: str) -> str:
        return fmt.request_dir(self.config.prefix, self.config.slot, request_id, self.config.epoch)

    def _register(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        seconds = Histogram("slam:checkpoint_seconds", "Time to upload one request checkpoint", registry=registry)
        nbytes = Counter("slam:checkpoint_bytes", "Bytes uploaded by checkpoints", registry=registry)
        failures = Counter("slam:checkpoint_failures", "Checkpoint uploads that failed", registry=registry)
        self.on_upload.append(lambda s, b: (seconds.observe(s), nbytes.inc(b)))
        self.on_failure.append(failures.inc)

    # --- decode-thread API ---------------------------------------------------------------------------
    def snapshot(self, seq: Sequence) -> Snapshot:
        """Copy `seq` now (call at a step boundary, on the thread that runs engine.step)."""
        with self._cond:
            tr = self._trackers.setdefault(seq.request_id, Tracker())
            stored = list(tr.stored) if tr.stored else None
            tr.last_tokens = len(seq.output_ids)
        return take_snapshot(seq, stored, self.config.include_reserve)

    def submit(self, snap: Snapshot, block: bool = False, timeout: float | None = None) -> bool:
        """Queue a snapshot for upload. Never waits on the store unless `block` (shutdown path)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self.fenced:
                return False
            old = self._pending.get(snap.request_id)
            if old is not None and old.kind == "delete":
                return False  # the request finished; its objects are being removed
            if old is not None:
                self.coalesced_total += 1
                del self._pending[snap.request_id]
            while block and len(self._pending) >= self.config.queue_size and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            if len(self._pending) >= self.config.queue_size:
                victim = next((k for k, it in self._pending.items() if it.kind == "upload"), None)
                if victim is None:
                    return False
                del self._pending[victim]  # its request is snapshotted again at its next interval
                self.dropped_total += 1
                if victim in self._trackers:
                    self._trackers[victim].last_tokens = -1
            self._pending[snap.request_id] = _Item("upload", snap)
            self._cond.notify_all()
        return True

    def checkpoint(self, seq: Sequence) -> bool:
        return self.submit(self.snapshot(seq))

    def after_step(self, seqs: Iterable[Sequence]) -> None:
        """Call with the sequences that produced a token this step: checkpoints the due ones (after the
        first token, then every `interval_tokens`), deletes the finished ones."""
        for seq in seqs:
            if seq.finished:
                if seq.request_id in self._trackers:  # never checkpointed: nothing to delete
                    self.delete_request(seq.request_id, self._finished_record(seq))
                continue
            # A request with a token in flight (async scheduling) has a slot ahead of its tokens: it is
            # snapshotted once at rest, which the engine's barrier (due_next) arranges.
            if not seq.in_flight and self.due_next(seq):
                self.checkpoint(seq)

    def due_next(self, seq: Sequence) -> bool:
        """Whether `seq` is due for a checkpoint once its tokens in flight arrive (now, when none are): after its
        first token, then every `interval_tokens`. The engine's barrier: such a request sits out the next step,
        so that it is at rest when after_step snapshots it."""
        tr = self._trackers.get(seq.request_id)
        last = -1 if tr is None else tr.last_tokens
        tokens = len(seq.output_ids) + seq.in_flight
        return last < 0 or tokens - last >= self.config.interval_tokens

    def checkpoint_all(self, seqs: Iterable[Sequence], timeout: float) -> bool:
        """Graceful shutdown: snapshot every request now and wait until all are stored."""
        deadline = time.monotonic() + timeout
        for seq in seqs:
            if not seq.finished:
                self.submit(self.snapshot(seq), block=True, timeout=max(deadline - time.monotonic(), 0))
        return self.flush(max(deadline - time.monotonic(), 0))

    def delete_request(self, request_id: str, record: dict | None = None) -> None:
        """Remove a finished or aborted request's objects (asynchronously; replaces any pending snapshot),
        leaving `record` in their place when given (layout.FINISHED)."""
        with self._cond:
            self._pending.pop(request_id, None)
            self._pending[request_id] = _Item("delete", body=record)
            self._cond.notify_all()

    def _finished_record(self, seq: Sequence) -> dict | None:
        if not self.config.advertise_url:
            return None  # no replica could forward to us anyway
        return {"request_id": seq.request_id, "owner_url": self.config.advertise_url, "finished_unix": time.time(),
                "finish_reason": seq.finish_reason, "output_tokens": len(seq.output_ids)}

    def claim(self, restored_from: dict[str, int] | None = None, timeout: float | None = None) -> bool:
        """Store this epoch's marker before any later upload. With `timeout`, wait for it; False when it
        is not stored by then."""
        cfg = self.config
        body = {"slot": cfg.slot, "epoch": cfg.epoch, "owner_url": cfg.advertise_url, "claimed_unix": time.time(),
                "restored_from": restored_from, "instance": self.instance}
        with self._cond:
            self._pending[CLAIM] = _Item("claim", body=body)
            self._pending.move_to_end(CLAIM, last=False)
            self._cond.notify_all()
        if timeout is None:
            return self.claimed
        return self.flush(timeout) and self.claimed

    def adopt(self, request_id: str, state: dict[str, Any], source: str | None = None) -> bool:
        """Continue a restored request's numbering and reuse its stored prompt and segments
        (`state` is RestoredRequest.store_state()). `source`: the request directory it was restored from,
        when that is not ours (an older epoch, another slot); its prompt and segments are then copied into
        ours on the store's side. False when that copy fails: the next checkpoint then uploads everything."""
        state = dict(state)
        root = self.root(request_id)
        if source is not None and source != root:
            entries = [e for e in (state.get("prompt"), *state.get("segments", [])) if e]
            try:
                for entry in entries:
                    self.store.copy(source + entry["name"], root + entry["name"])
            except Exception as e:
                log.warning("could not copy %s from %s, it is uploaded again: %s", request_id, source, e)
                return False
            state["versions"] = []
        with self._cond:
            self._trackers[request_id] = Tracker(**state)
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until every pending upload and delete is done; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def pending(self) -> int:
        """Queued snapshots and deletes, not counting the one being uploaded."""
        with self._cond:
            return len(self._pending)

    def close(self, timeout: float = 0.0) -> None:
        if timeout:
            self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # --- worker --------------------------------------------------------------------------------------
    def _next(self) -> tuple[str, _Item] | None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                # The claim goes first: nothing is written at an epoch before its marker is.
                items = [(CLAIM, self._pending[CLAIM])] if CLAIM in self._pending else self._pending.items()
                ready = next(((k, it) for k, it in items if it.not_before <= now), None)
                if ready is not None:
                    del self._pending[ready[0]]
                    self._busy = True
                    return ready
                wake = min((it.not_before for it in self._pending.values()), default=now + 1.0)
                self._cond.wait(max(wake - now, 0.001))
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            rid, item = job
            try:
                if self.fenced:
                    continue  # another pod holds this epoch: nothing more is written to it
                if item.kind == "delete":
                    self._delete(rid, item.body)
                elif item.kind == "claim":
                    self._claim(item.body)
                else:
                    self._upload(item.snap)
            except Exception as e:  # store outage, or anything else: count it, retry later, keep serving
                self._failed(rid, item, e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _failed(self, rid: str, item: _Item, err: Exception) -> None:
        self.failures_total += 1
        for cb in self.on_failure:
            cb()
        item.attempts += 1
        delay = min(self.config.backoff_s * 2 ** (item.attempts - 1), self.config.backoff_max_s)
        log.warning(
            "checkpoint %s of %s failed (attempt %d), retry in %.1fs: %s", item.kind, rid, item.attempts, delay, err
        )
        item.not_before = time.monotonic() + delay
        with self._cond:
            if rid not in self._pending and not self._closed:  # a newer snapshot or a delete supersedes it
                self._pending[rid] = item

    def _claim(self, body: dict) -> None:
        cfg = self.config
        marker = fmt.epoch_dir(cfg.prefix, cfg.slot, cfg.epoch) + fmt.EPOCH_MARKER
        if not self.store.put_if_absent(marker, fmt.encode_manifest(body)):
            held = fmt.decode_manifest(self.store.get(marker))
            if held.get("instance") != self.instance:  # not our own earlier write whose answer was lost
                self._fence(f"slot {cfg.slot} epoch {cfg.epoch} is already claimed by {held.get('owner_url')} "
                            f"(instance {held.get('instance')}); two pods for one slot and epoch")
                return
        self.claimed = True
        log.info("claimed slot %d epoch %d", cfg.slot, cfg.epoch)

    def _fence(self, reason: str) -> None:
        log.error("checkpoints stop: %s", reason)
        with self._cond:
            self.fenced = reason
            self._pending.clear()
            self._cond.notify_all()

    def _delete(self, rid: str, record: dict | None) -> None:
        root = self.root(rid)
        if record is not None:  # first: an owner lookup half-way through finds the record or a manifest
            self.store.put(root + fmt.FINISHED, fmt.encode_manifest(record))
        # Manifests first: a restore that lists the request half-way through finds no version, not broken ones.
        names = sorted((n for n in self.store.list(root) if record is None or n != root + fmt.FINISHED),
                       key=lambda n: not n.endswith(fmt.MANIFEST))
        for name in names:
            self.store.delete(name)
        with self._cond:
            self._trackers.pop(rid, None)
            self.last_upload.pop(rid, None)

    def _upload(self, snap: Snapshot) -> None:
        t0 = time.monotonic()
        cfg = self.config
        rid = snap.request_id
        with self._cond:
            tr = self._trackers.setdefault(rid, Tracker())
        root = self.root(rid)
        sizes: dict[str, int] = {}

        def put(kind: str, name: str, data: bytes) -> dict:
            self.store.put(root + name, data)
            sizes[kind] = sizes.get(kind, 0) + len(data)
            return fmt.object_entry(name, data)

        # Write-once objects first; each is valid on its own, so they count even if this version fails.
        if tr.prompt is None:
            tr.prompt = put("prompt", "prompt.safetensors", encode_prompt(snap))
        if snap.reserve is not None:
            seg = encode_segment(snap, tr.stored or [0] * len(snap.reserve), cfg.reserve_int8)
            if seg is not None:
                data, first, last, ends = seg
                entry = put("segment", fmt.segment_name(first, last), data)
                with self._cond:
                    tr.segments.append({**entry, "first": first, "last": last, "ends": ends})
                    tr.stored = ends
        version = tr.version + 1
        vdir = fmt.version_dir(version)
        tokens = put("tokens", vdir + "tokens.safetensors", encode_tokens(snap))
        objects: dict[str, Any] = {"prompt": tr.prompt, "tokens": tokens}
        state = encode_state(snap)
        objects["state"] = None if state is None else put("state", vdir + "state.safetensors", state)
        objects["segments"] = list(tr.segments) if snap.reserve is not None else []
        manifest = fmt.encode_manifest(manifest_body(snap, version, objects, self.config))
        put("manifest", vdir + fmt.MANIFEST, manifest)  # last: only now does this version exist
        tr.version = version
        tr.versions.append(version)
        apply_retention(self.store, self.config.retention, root, tr)
        seconds, nbytes = time.monotonic() - t0, sum(sizes.values())
        self.uploads_total += 1
        self.bytes_total += nbytes
        self.durations.append(seconds)
        self.last_upload[rid] = sizes
        for cb in self.on_upload:
            cb(seconds, nbytes)
