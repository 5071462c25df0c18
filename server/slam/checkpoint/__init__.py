"""Checkpoints of in-flight requests in S3, so they survive a crash of the server (design.md section 3).

    store = ObjectStore(CheckpointConfig(...))
    ckpt = Checkpointer(store, config, registry)       # one background upload thread
    ckpt.after_step([out.seq for out in engine.step()])  # decode loop: snapshot due requests, drop finished
    ckpt.checkpoint_all(engine.scheduler.running, 30)   # SIGTERM
    for r in load_slot(store, slot):                    # start with --restore-slot
        seq = resume_into(engine, r); ckpt.adopt(r.request_id, r.store_state())
"""

from slam.checkpoint.checkpointer import Checkpointer
from slam.checkpoint.restore import RestoredRequest, load_slot, resume_into
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
    "load_slot",
    "resume_into",
    "take_snapshot",
]
