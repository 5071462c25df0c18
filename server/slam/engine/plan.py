"""Host-side inputs of a step: the decode plan of every slot and the sampling parameters of every row.

Everything here is plain Python over a few integers per request, so the device never has to be asked
where a request stands: the host knows each slot's length and layout, and sends them in one copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slam.cache import POLICY_IDS
from slam.engine.model_runner import BUCKETS, PLAN_ROWS
from slam.engine.prefill import column
from slam.engine.sampler import SamplingBatch
from slam.engine.sequence import Sequence

if TYPE_CHECKING:
    from slam.engine.engine import LLMEngine


def bucket(n: int, slots: int) -> int:
    return min(next((b for b in BUCKETS if b >= n), n), slots)


def decode_plan(engine: LLMEngine, decoding: list[Sequence]) -> tuple[torch.Tensor, int, frozenset[str]]:
    """(rows [len(PLAN_ROWS), bucket], kc, policies) for a decode step of `decoding` over slots [0, bucket)."""
    runner, pool = engine.runner, engine.runner.pool
    b = bucket(len(engine.slots), pool.slots)
    rows = runner.dry_rows(b)
    col = {name: i for i, name in enumerate(PLAN_ROWS)}
    kc, policies, top = 0, set(), 0
    for seq in decoding:
        p, length, i = seq.policy, seq.num_cached, seq.slot
        _, _, _, before = p.counts(length)
        after = p.counts(length + 1)[3]
        evict = after > before
        rows[col["tokens"], i] = seq.all_ids[length]
        rows[col["pos"], i] = length
        rows[col["write"], i] = column(p, length)
        rows[col["evict"], i] = int(evict)
        rows[col["middle"], i] = p.middle
        rows[col["sink"], i] = p.sink
        rows[col["rank"], i] = p.cache_tokens(length + 1) - 1
        rows[col["policy"], i] = POLICY_IDS[p.name]
        if p.uses_reserve:
            pool.ensure_reserve(max(after, p.middle, 1))
            rows[col["reserve_n"], i] = after
            kc = max(kc, p.middle)
        policies.add(p.name)
        top = max(top, length + 1)
    reserve_at = col["reserve_at"]
    for seq in decoding:  # after any growth of the reserve above: its scratch index moved
        p, length = seq.policy, seq.num_cached
        before, after = p.counts(length)[3], p.counts(length + 1)[3]
        rows[reserve_at, seq.slot] = before if p.uses_reserve and after > before else pool.cap
    for i in range(b):
        if rows[col["policy"], i] < 0:
            rows[reserve_at, i] = pool.cap
    runner.rope.ensure(top + 1)
    return rows, kc, frozenset(policies)


def sampling_batch(rows: list[Sequence], device: torch.device) -> SamplingBatch:
    params = [s.sampling for s in rows]
    floats = torch.tensor([[p.temperature, p.top_p] for p in params], dtype=torch.float32)
    ints = torch.tensor([[p.top_k, s.seed, len(s.output_ids)] for p, s in zip(params, rows)], dtype=torch.long)
    floats, ints = floats.to(device, non_blocking=True), ints.to(device, non_blocking=True)
    return SamplingBatch(floats[:, 0], floats[:, 1], ints[:, 0], ints[:, 1], ints[:, 2],
                         any_random=any(not p.greedy for p in params))
