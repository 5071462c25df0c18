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
from slam.checkpoint import Checkpointer, ObjectStore, load_slot, resume_into
from slam.config import ServerSettings
from slam.engine.engine import LLMEngine
from slam.engine.sequence import Sequence

log = logging.getLogger("slam.api")
SHUTDOWN_CHECKPOINT_S = 30.0


def setup(settings: ServerSettings, registry: Any) -> tuple[ObjectStore | None, Checkpointer | None]:
    config = settings.checkpoint_config()
    if config is None:
        log.warning("checkpointing is off (no --s3-endpoint): in-flight requests do not survive a crash")
        return None, None
    store = ObjectStore(config)
    log.warning("checkpoints every %d tokens to %s bucket %s prefix %s slot %d, owner %s", config.interval_tokens,
                config.endpoint, config.bucket, config.prefix, config.slot, config.advertise_url)
    return store, Checkpointer(store, config, registry)


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
    """Resume every request of `slot` into `engine` before the server admits anything. Returns timings."""
    t0 = time.monotonic()
    restored = load_slot(store, slot)
    fetched = time.monotonic()
    same_slot = slot == ckpt.config.slot
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
        if same_slot:  # new versions continue the old numbering and reuse the stored prompt and segments
            ckpt.adopt(r.request_id, r.store_state())
        # Written at once, so the manifests name this replica as the owner (proxying finds us) right away.
        ckpt.checkpoint(seq)
        resumed[r.request_id] = {"status": r.status, "version": r.version, "output_tokens": len(r.output_ids)}
        rec.restore = resumed[r.request_id]
        if r.reason:
            log.warning("request %s restored as %s: %s", r.request_id, r.status, r.reason)
    if not same_slot:  # another replica's slot: it is ours now; its old copies would name a dead owner
        threading.Thread(target=_drop_slot, args=(store, slot, list(resumed)), daemon=True).start()
    timings = {"checkpoint_fetch_s": fetched - t0, "resume_s": time.monotonic() - fetched,
               "requests": len(resumed), "lost": len(restored) - len(resumed)}
    _time_first_steps(loop, resumed, time.monotonic())
    return timings


def _drop_slot(store: ObjectStore, slot: int, request_ids: list[str]) -> None:
    from slam.checkpoint import format as fmt

    for rid in request_ids:
        try:
            store.delete_prefix(fmt.request_dir(store.config.prefix, slot, rid))
        except Exception as e:
            log.warning("could not delete slot %d copy of %s: %s", slot, rid, e)


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
