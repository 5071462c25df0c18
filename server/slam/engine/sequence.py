"""Per-request state: tokens, sampling parameters, RNG and the compressed cache."""

from __future__ import annotations

import enum
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field, model_validator

from slam.cache import CachePolicy, make_policy
from slam.config import CacheConfig


class SamplingParams(BaseModel):
    """How one request picks its tokens, with vLLM's semantics (OpenAI's where both define a field).

    Order inside a step: the raw logits get the penalties (repetition over prompt and output tokens,
    then frequency and presence over output tokens), then, while fewer than `min_tokens` were generated,
    EOS and `stop_token_ids` are masked; then greedy argmax, or temperature, top-k, top-p and a draw.
    `logprobs` (top-k count, 0: the chosen token only) reports log-probabilities of the raw model
    distribution, before penalties and temperature (vLLM's default `raw_logprobs`).
    No stop condition (EOS, stop token, stop string) applies before `min_tokens` tokens.
    """

    model_config = {"extra": "forbid"}

    max_tokens: int = Field(default=16, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=2**31 - 1)  # 0: no top-k cut; above the vocabulary: none either
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    # Multiplies (divides, for positive logits) the logits of every token seen in the prompt or output.
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=2.0)  # a tinier one overflows float32 logits
    # Subtracted from the logit of each output token: once (presence), per occurrence (frequency).
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return self

    @property
    def greedy(self) -> bool:
        # Below this, dividing float32 logits by the temperature overflows; the limit is greedy anyway.
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


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
    # No prefill chunk crosses these prompt positions: the context before one is compressed before any
    # later token is computed (the "question unseen" setting of kvpress's leaderboard).
    prefill_boundaries: list[int] = field(default_factory=list)
    forced_ids: list[int] | None = None  # teacher forcing: these are the "generated" tokens, in order
    # Async scheduling: tokens sampled on the device whose step the host has not postprocessed yet, and the row
    # of the newest one in its step's sampled ids (the next step reads its input token there).
    in_flight: int = 0
    prev_row: int = -1

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
    def needs_host(self) -> bool:
        """Whether sampling its next token needs its tokens on the host (penalties, the min_tokens mask,
        logprobs, teacher forcing), so that no step may run ahead of its postprocessing."""
        p = self.sampling
        return (p.penalized or p.logprobs is not None or self.forced_ids is not None
                or len(self.output_ids) + self.in_flight < p.min_tokens)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def ids(self, start: int, stop: int | None = None) -> list[int]:
        """all_ids[start:stop] without building the whole list (which grows with the context)."""
        n = len(self.prompt_ids)
        stop = self.length if stop is None else min(stop, self.length)
        if start >= n:
            return self.output_ids[start - n : stop - n]
        return self.prompt_ids[start:stop] + (self.output_ids[: stop - n] if stop > n else [])

    def next_chunk(self, limit: int) -> list[int]:
        end = self.num_cached + limit
        end = min([b for b in self.prefill_boundaries if self.num_cached < b < end] + [end])
        return self.ids(self.num_cached, end)

    def cache_tokens(self, through: int | None = None) -> int:
        """Tokens per layer and KV head in the active cache once `through` tokens went through the model
        (default: num_cached, which counts steps still in flight too)."""
        return self.policy.cache_tokens(self.num_cached if through is None else through) if self.slot is not None else 0

    def cache_bytes(self) -> int:
        """Bytes of the active cache (what a budget bounds), without the slam reserve tier."""
        return self.cache_tokens() * self.token_bytes
