"""Host-side inputs of a step: the decode plan of every slot and the sampling parameters of every row.

Everything here is plain Python over a few integers per request, so the device never has to be asked
where a request stands: the host knows each slot's length and layout, and sends them in one copy.
"""

from __future__ import annotations

import torch

from slam.cache import POLICY_IDS
from slam.engine.model_runner import BUCKETS, ModelRunner
from slam.engine.prefill import column, to_device
from slam.engine.sampler import SamplingBatch
from slam.engine.sequence import Sequence


def bucket(n: int, slots: int) -> int:
    return min(next((b for b in BUCKETS if b >= n), n), slots)


def decode_plan(runner: ModelRunner, running: int, decoding: list[Sequence]
                ) -> tuple[torch.Tensor, int, frozenset[str]]:
    """(rows [len(PLAN_ROWS), bucket], kc, policies) for a decode step of `decoding` over slots [0, bucket), where
    `running` slots are taken."""
    pool = runner.pool
    b = bucket(running, pool.slots)
    kc, policies, top = 0, set(), 0
    for seq in decoding:  # first grow the reserve if needed: its scratch index is its capacity
        p = seq.policy
        if p.uses_reserve:
            pool.ensure_reserve(p.reserve_rows(seq.num_cached + 1))
            kc = max(kc, p.middle)
        policies.add(p.name)
        top = max(top, seq.num_cached + 1)
    idle = [0, 0, pool.budget, 0, pool.cap, 0, 0, 0, 0, -1, -1]  # an inactive slot: writes land in scratch
    columns = [list(idle) for _ in range(b)]
    for seq in decoding:
        p, n = seq.policy, seq.num_cached
        before, after = p.counts(n)[3], p.counts(n + 1)[3]
        evict = after > before
        # A token still in flight (async scheduling) is read on the device, from the row its step sampled it in.
        token, prev = (seq.ids(n, n + 1)[0], -1) if n < seq.length else (0, seq.prev_row)
        columns[seq.slot] = [
            token, n, column(p, n), int(evict), before if p.uses_reserve and evict else pool.cap,
            after if p.uses_reserve else 0, p.middle, p.sink, p.cache_tokens(n + 1) - 1, POLICY_IDS[p.name], prev,
        ]
    rows = torch.tensor(columns, dtype=torch.long).t()
    if pool.device.type == "cuda":
        rows = rows.contiguous().pin_memory()
    runner.rope.ensure(top + 1)
    return rows, kc, frozenset(policies)


def sampling_batch(rows: list[Sequence], device: torch.device) -> SamplingBatch | None:
    """The rows' sampling parameters on the device; None when every row is greedy (argmax needs none)."""
    params = [s.sampling for s in rows]
    if all(p.greedy for p in params):
        return None
    floats = torch.tensor([[p.temperature, p.top_p] for p in params], dtype=torch.float32)
    # The noise counter is the index of the token drawn: tokens still in flight count (async scheduling).
    ints = torch.tensor([[p.top_k, s.seed, len(s.output_ids) + s.in_flight] for p, s in zip(params, rows)],
                        dtype=torch.long)
    floats, ints = to_device(floats, device), to_device(ints, device)
    return SamplingBatch(floats[:, 0], floats[:, 1], ints[:, 0], ints[:, 1], ints[:, 2])
