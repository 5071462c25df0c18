"""A request's state copied at a step boundary, and its encoding into checkpoint objects.

`take_snapshot` runs on the decode thread, so it only copies (clones) what the next steps may replace;
serialization, hashing and uploads happen later on the checkpointer's thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from slam.checkpoint import format as fmt
from slam.engine.sequence import Sequence


@dataclass
class LayerSnap:
    k: torch.Tensor  # [kv_heads, n, head_dim]
    v: torch.Tensor  # [kv_heads, n, head_dim]
    pos: torch.Tensor  # [kv_heads, n] int64
    score: torch.Tensor  # [kv_heads, n] float32


@dataclass
class ReserveSnap:
    """Reserve tokens [start, n) of one layer; tokens below `start` were uploaded before."""

    start: int
    n: int
    next_pos: int  # tokens evicted so far (equal to n)
    k: torch.Tensor  # [kv_heads, n - start, head_dim]
    v: torch.Tensor  # [kv_heads, n - start, head_dim]
    k_score: torch.Tensor | None  # same shape; None when the reserve scores with `k` itself ("original" mode)
    pos: torch.Tensor  # [n - start] int64


@dataclass
class Snapshot:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    num_cached: int
    rng_state: torch.Tensor  # int64 [1]: the sampler's seed (its noise depends on seed and step only)
    sampling: dict
    cache_config: dict
    output_text: str
    prefix_offset: int
    read_offset: int
    replacements: int
    layers: list[LayerSnap] | None  # None before the first forward pass
    reserve: list[ReserveSnap] | None  # None: no reserve tier, or not checkpointed (include_reserve=False)
    reserve_next_pos: int | None  # tokens evicted to the reserve (kept when the reserve itself is not)
    taken_at: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def take_snapshot(seq: Sequence, reserve_from: list[int] | None = None, include_reserve: bool = True) -> Snapshot:
    """Copy `seq` at a step boundary through its policy's `state()`. `reserve_from[i]`: reserve tokens of
    layer i already stored."""
    layers, reserve, evicted = None, None, None
    if seq.slot is not None and seq.num_cached:
        start = min(reserve_from) if reserve_from else 0
        state = seq.policy.state(seq.pool, seq.slot, seq.num_cached, start)
        layers = [LayerSnap(*(state[n][i] for n in ("k", "v", "pos", "score"))) for i in range(state["k"].shape[0])]
        if "rk" in state:
            evicted = start + state["rk"].shape[2]
            if include_reserve:
                rks = state.get("rks")
                reserve = [
                    ReserveSnap(start=start, n=evicted, next_pos=evicted, k=state["rk"][i], v=state["rv"][i],
                                k_score=None if rks is None else rks[i], pos=state["rpos"])
                    for i in range(len(layers))
                ]
    return Snapshot(
        request_id=seq.request_id,
        prompt_ids=list(seq.prompt_ids),
        output_ids=list(seq.output_ids),
        num_cached=seq.num_cached,
        rng_state=torch.tensor([seq.seed], dtype=torch.int64),
        sampling=seq.sampling.model_dump(),
        cache_config=seq.cache_config.model_dump(),
        output_text=seq.output_text,
        prefix_offset=seq.prefix_offset,
        read_offset=seq.read_offset,
        replacements=seq.replacements,
        layers=layers,
        reserve=reserve,
        reserve_next_pos=evicted,
    )


# --- encoding (checkpointer thread) ------------------------------------------------------------------
def encode_prompt(snap: Snapshot) -> bytes:
    return fmt.save({"prompt_ids": torch.tensor(snap.prompt_ids, dtype=torch.int64)})


def encode_tokens(snap: Snapshot) -> bytes:
    return fmt.save(
        {"output_ids": torch.tensor(snap.output_ids, dtype=torch.int64).reshape(-1), "rng_state": snap.rng_state}
    )


def encode_state(snap: Snapshot) -> bytes | None:
    """The active cache: k, v [layers, kv_heads, n, head_dim]; pos, score [layers, kv_heads, n]."""
    if snap.layers is None:
        return None
    out: dict[str, torch.Tensor] = {}
    for name in ("k", "v", "pos", "score"):
        fmt.pack_layers(name, [getattr(layer, name) for layer in snap.layers], out)
    return fmt.save(out)


def encode_segment(snap: Snapshot, stored: list[int], int8: bool) -> tuple[bytes, int, int, list[int]] | None:
    """Reserve tokens [stored[i], n) of every layer as one object: (bytes, first, last, end per layer).

    None when no layer has a new token. INT8 stores q (int8) plus a float32 scale per token and head.
    """
    assert snap.reserve is not None
    firsts, ends = [], []
    parts: dict[str, list[torch.Tensor]] = {"k": [], "v": [], "k_score": [], "pos": []}
    for i, r in enumerate(snap.reserve):
        first = max(stored[i], r.start)
        if stored[i] < r.start:
            raise RuntimeError(f"reserve layer {i}: tokens [{stored[i]}, {r.start}) are in no snapshot")
        off = first - r.start
        firsts.append(first)
        ends.append(r.n)
        parts["k"].append(r.k[:, off:])
        parts["v"].append(r.v[:, off:])
        parts["pos"].append(r.pos[off:])
        if r.k_score is not None:
            parts["k_score"].append(r.k_score[:, off:])
    if all(e == f for f, e in zip(firsts, ends)):
        return None
    out: dict[str, torch.Tensor] = {"first": torch.tensor(firsts, dtype=torch.int64)}
    for name, tensors in parts.items():
        if not tensors:
            continue
        if int8 and name != "pos":
            qs = [fmt.quantize_int8(t) for t in tensors]
            fmt.pack_layers(name, [q for q, _ in qs], out)
            fmt.pack_layers(f"{name}_scale", [s for _, s in qs], out)
        else:
            fmt.pack_layers(name, tensors, out)
    return fmt.save(out), min(firsts), max(ends) - 1, ends
