"""Per-request state: tokens, sampling parameters, RNG and the compressed cache."""

from __future__ import annotations

import enum
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from slam.cache import CachePolicy, make_policy
from slam.config import CacheConfig


class SamplingParams(BaseModel):
    model_config = {"extra": "forbid"}

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # 0: no top-k cut
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        # Below this, dividing float32 logits by the temperature overflows; the limit is greedy anyway.
        return self.temperature < 1e-5


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    pool_budget: int | None = None  # columns of a pool slot; `full` takes them all
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_cached: int = 0  # tokens that went through the model (held in the slot or evicted from it)
    finish_reason: str | None = None
    output_text: str = ""
    slot: int | None = None  # the pool slot while the request runs
    token_bytes: int = 0  # bytes of keys and values per cached token (all layers), set with the slot
    pool: Any = None  # the engine's SlotPool while the request holds a slot (checkpoints read it)
    replacements: int = 0
    aborted: bool = False
    # Offsets for incremental detokenization: text of ids[prefix:read] has already been emitted.
    prefix_offset: int = 0
    read_offset: int = 0
    seed: int = 0  # the sampler's counter-based noise depends only on (seed, tokens generated)

    def __post_init__(self) -> None:
        self.policy: CachePolicy = make_policy(self.cache_config, self.pool_budget)
        self.seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(62)
        self.prefix_offset = self.read_offset = len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilled(self) -> bool:
        """Whether only the newest token is still to be processed (a decode step).

        A restored request that must recompute its cache has generated tokens pending too; they are
        prefilled in chunks like the prompt."""
        return self.length - self.num_cached <= 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def next_chunk(self, limit: int) -> list[int]:
        return self.all_ids[self.num_cached : self.num_cached + limit]

    def cache_tokens(self) -> int:
        """Tokens per layer and KV head in the active cache."""
        return self.policy.cache_tokens(self.num_cached) if self.slot is not None else 0

    def cache_bytes(self) -> int:
        """Bytes of the active cache (what a budget bounds), without the slam reserve tier."""
        return self.cache_tokens() * self.token_bytes
