"""Server side of checkpoints: building the store from ServerSettings, restoring a slot at start, and the
graceful-shutdown checkpoint (design.md section 3; the library is slam.checkpoint)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from slam.api.loop import EngineLoop
from slam.checkpoint import Checkpointer, ObjectStore, StoreError, latest_epoch, load_slot, resume_into
from slam.checkpoint import format as fmt
from slam.checkpoint.store import CheckpointConfig
from slam.config import ServerSettings
from slam.engine.engine import LLMEngine
from slam.engine.sequence import Sequence

log = logging.getLogger("slam.api")
SHUTDOWN_CHECKPOINT_S = 30.0


class EpochConflict(RuntimeError):
    """The slot is claimed at this server's epoch or a higher one: another pod holds (or held) it."""


def setup(settings: ServerSettings, registry: Any) -> tuple[ObjectStore | None, Checkpointer | None]:
    config = settings.checkpoint_config()
    if config is None:
        log.warning("checkpointing is off (no --s3-endpoint): in-flight requests do not survive a crash")
        return None, None
    store = ObjectStore(config)
    log.warning("checkpoints every %d tokens to %s bucket %s prefix %s slot %d epoch %d, owner %s",
                config.interval_tokens, config.endpoint, config.bucket, config.prefix, config.slot, config.epoch,
                config.advertise_url)
    # A restoring server claims its epoch only once the restored requests are stored under it (restore()).
    return store, Checkpointer(store, config, registry, claim=settings.restore_slot is None)


def refuse_stale_epoch(config: CheckpointConfig, held: int | None) -> None:
    if held is not None and config.epoch <= held:
        raise EpochConflict(
            f"slot {config.slot} is already claimed at epoch {held} in the checkpoint store; this server's epoch "
            f"{config.epoch} must be higher (two pods for one slot?)")


def check_epoch(settings: ServerSettings) -> None:
    """Before the model loads: raise EpochConflict when our slot is claimed at our epoch or above. A store
    that does not answer is not a conflict: a restore then fails on its own, a fresh start goes on."""
    config = settings.checkpoint_config()
    if config is None:
        return
    try:
        held = latest_epoch(ObjectStore(config), config.slot)
    except StoreError as e:
        log.warning("could not read slot %d's epochs from the store: %s", config.slot, e)
        return
    refuse_stale_epoch(config, held)


def _replay_text(engine: LLMEngine, seq: Sequence, output_ids: list[int]) -> list[tuple[int, str]]:
    """Per-token text deltas of tokens generated before the crash, decoded exactly as the engine did, so a
    resumed client sees the same text chunks as the original stream."""
    tmp = Sequence(list(seq.prompt_ids), seq.sampling, seq.cache_config, request_id="replay")
    out = []
    for token in output_ids:
        tmp.output_ids.append(token)
        out.append((token, engine.detokenize(tmp)))
    return out


def restore(engine: LLMEngine, loop: EngineLoop, store: ObjectStore, ckpt: Checkpointer, slot: int) -> dict:
    """Resume every request of `slot`'s highest claimed epoch into `engine` before the server admits
    anything, store them at our epoch and claim it. Returns timings."""
    t0 = time.monotonic()
    own = ckpt.config
    epoch = latest_epoch(store, slot)
    if slot == own.slot:
        refuse_stale_epoch(own, epoch)
    restored = [] if epoch is None else load_slot(store, slot, epoch=epoch)
    fetched = time.monotonic()
    resumed: dict[str, dict] = {}
    for r in restored:
        try:  # each request on its own: one odd request is reported, never stops the server
            seq = resume_into(engine, r)
        except Exception as e:
            log.exception("request %s could not be restored: %s", r.request_id, e)
            continue
        if seq is None:
            log.error("request %s could not be restored: %s", r.request_id, r.reason)
            continue
        rec = loop.buffers.open(r.request_id, _replay_text(engine, seq, r.output_ids))
        # New versions continue the old numbering and reuse the stored prompt and segments (copied over).
        ckpt.adopt(r.request_id, r.store_state(), source=fmt.request_dir(own.prefix, slot, r.request_id, epoch))
        if not ckpt.submit(ckpt.snapshot(seq), block=True, timeout=SHUTDOWN_CHECKPOINT_S):
            raise RuntimeError(f"could not queue the checkpoint of restored request {r.request_id}")
        resumed[r.request_id] = {"status": r.status, "version": r.version, "output_tokens": len(r.output_ids),
                                 "epoch": epoch}
        rec.restore = resumed[r.request_id]
        if r.reason:
            log.warning("request %s restored as %s: %s", r.request_id, r.status, r.reason)
    # Our epoch counts only once it holds every restored request: if we die before the claim, the next pod
    # restores from `epoch` again; once claimed, `epoch` and everything below it are stale.
    restored_from = None if epoch is None else {"slot": slot, "epoch": epoch}
    if not (ckpt.flush(SHUTDOWN_CHECKPOINT_S) and ckpt.claim(restored_from, timeout=SHUTDOWN_CHECKPOINT_S)):
        raise RuntimeError(f"could not store the restored requests and claim slot {own.slot} epoch {own.epoch}")
    threading.Thread(target=_drop_stale, args=(store, own, slot, epoch, list(resumed)), daemon=True).start()
    timings = {"checkpoint_fetch_s": fetched - t0, "resume_s": time.monotonic() - fetched,
               "requests": len(resumed), "lost": len(restored) - len(resumed), "epoch": epoch}
    _time_first_steps(loop, resumed, time.monotonic())
    return timings


def _drop_stale(store: ObjectStore, own: CheckpointConfig, slot: int, epoch: int | None, request_ids: list[str]
                ) -> None:
    """Delete what nobody reads any more: our slot's older epochs, or the copies we took from another slot."""
    try:
        if slot == own.slot:
            base = fmt.slot_dir(own.prefix, slot)
            for name in store.list_dirs(base):
                old = fmt.dir_number(name)
                if old is not None and old < own.epoch:
                    store.delete_prefix(fmt.epoch_dir(own.prefix, slot, old))
        elif epoch is not None:
            for rid in request_ids:
                store.delete_prefix(fmt.request_dir(own.prefix, slot, rid, epoch))
    except Exception as e:
        log.warning("could not delete stale checkpoints of slot %d: %s", slot, e)


def _time_first_steps(loop: EngineLoop, resumed: dict[str, dict], t_resumed: float) -> None:
    """Record, per restored request, the time from resume to its first new token."""
    waiting = set(resumed)

    def on_output(rid: str, now: float) -> None:
        if rid in waiting:
            waiting.discard(rid)
            resumed[rid]["first_step_s"] = now - t_resumed
            resumed[rid]["first_token_unix"] = time.time()
        if not waiting:
            loop.on_first_output.remove(on_output)

    if waiting:
        loop.on_first_output.append(on_output)


def report(timings: dict) -> None:
    """One JSON line on stderr: what `slam bench failover` reads."""
    print("slam-restore " + json.dumps(timings), file=sys.stderr, flush=True)
