"""Checkpoints of in-flight requests in S3, so they survive a crash of the server (design.md section 3).

    store = ObjectStore(CheckpointConfig(...))
    ckpt = Checkpointer(store, config, registry)       # one background upload thread; claims config.epoch
    ckpt.after_step([out.seq for out in engine.step()])  # decode loop: snapshot due requests, drop finished
    ckpt.checkpoint_all(engine.scheduler.running, 30)   # SIGTERM
    ckpt = Checkpointer(store, config, claim=False)    # start with --restore-slot, at a higher epoch:
    epoch = latest_epoch(store, slot)                   # the highest claimed epoch; older ones are stale
    for r in load_slot(store, slot, epoch=epoch):
        seq = resume_into(engine, r); ckpt.adopt(r.request_id, r.store_state(), source=<its directory>)
        ckpt.checkpoint(seq)
    ckpt.flush(30); ckpt.claim(timeout=30)              # the new epoch counts only once it holds them all

Tradeoffs (CheckpointConfig):
- reserve_int8=False (default): reserve segments are stored in the cache dtype, so a restore continues
  bit-for-bit. True stores INT8 with a float32 scale per token and head (about 3.8x smaller for fp32
  caches), but recalled keys and values then differ slightly and outputs after a restore may diverge.
- include_reserve=True (default): every reserve token is uploaded once, as append-only segments.
  False uploads only the active cache (bounded by the budget whatever the context); a restored slam
  request then starts with an empty reserve and can only recall tokens evicted after the restore.
- A re-prefill (every cached version broken) recomputes the cache from tokens: identical for `full` with
  greedy decoding in our tests, but compressed policies evict differently under chunked prefill than
  under step-by-step decoding, so their continuation may differ.
"""

from slam.checkpoint.checkpointer import Checkpointer
from slam.checkpoint.restore import RestoredRequest, latest_epoch, load_slot, resume_into
from slam.checkpoint.snapshot import Snapshot, take_snapshot
from slam.checkpoint.store import CheckpointConfig, ObjectMissing, ObjectStore, StoreError

__all__ = [
    "CheckpointConfig",
    "Checkpointer",
    "ObjectMissing",
    "ObjectStore",
    "RestoredRequest",
    "Snapshot",
    "StoreError",
    "latest_epoch",
    "load_slot",
    "resume_into",
    "take_snapshot",
]
