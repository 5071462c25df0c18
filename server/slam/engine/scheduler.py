"""Which requests run in the next step, and with how many new tokens each."""

from __future__ import annotations

import collections

from slam.engine.sequence import Sequence, Status


class Scheduler:
    """Continuous batching: decoding requests get one token a step, prefills share `prefill_chunk` tokens.

    New requests join the running batch between steps while a pool slot is free (`max_batch` slots);
    aborted ones leave at the next step. `add` and `abort` may be called from other threads.
    """

    def __init__(self, max_batch: int, prefill_chunk: int):
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def resume(self, seq: Sequence) -> None:
        """Take back a restored request: with its slot it decodes at the next step, without it prefills first
        (ahead of new requests)."""
        if seq.slot is not None:
            seq.status = Status.RUNNING
            self.running.append(seq)
        else:
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def reap_aborted(self) -> list[Sequence]:
        gone = [s for s in list(self.waiting) + self.running if s.aborted]
        for seq in gone:
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
        self.waiting = collections.deque(s for s in self.waiting if not s.aborted)
        self.running = [s for s in self.running if not s.aborted]
        return gone

    def schedule(self) -> list[tuple[Sequence, list[int]]]:
        batch = [(seq, seq.next_chunk(1)) for seq in self.running if seq.prefilled]
        tokens_left = self.prefill_chunk
        for seq in self.running:
            if not seq.prefilled and tokens_left > 0:
                chunk = seq.next_chunk(tokens_left)
                batch.append((seq, chunk))
                tokens_left -= len(chunk)
        while self.waiting and len(self.running) < self.max_batch and tokens_left > 0:
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunk = seq.next_chunk(tokens_left)
            batch.append((seq, chunk))
            tokens_left -= len(chunk)
        return batch

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
