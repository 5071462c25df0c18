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

from importlib import import_module

# Imported on first use, so that torch-free parts (layout, store) load without the engine and torch.
_EXPORTS = {
    "Checkpointer": "checkpointer", "RestoredRequest": "restore", "latest_epoch": "restore",
    "load_slot": "restore", "resume_into": "restore", "Snapshot": "snapshot", "take_snapshot": "snapshot",
    "CheckpointConfig": "store", "ObjectMissing": "store", "ObjectStore": "store", "StoreError": "store",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"slam.checkpoint.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'slam.checkpoint' has no attribute {name!r}")


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
