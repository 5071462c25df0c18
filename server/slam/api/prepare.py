"""Turning a validated OpenAI request into what the engine takes: prompt ids, sampling, cache config.

Every check that can fail is done here, before the request reaches the engine thread, and fails as an
`APIError` (400/404) that names the offending field. The server's limits (--max-model-len, --max-n,
--allowed-policies, --max-budget) are enforced here, whatever the client asks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pydantic import ValidationError

from slam.api.errors import APIError
from slam.api.schemas import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    SlamCacheParams,
)
from slam.config import CacheConfig, ServerSettings
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams


@dataclass
class Prepared:
    prompt_ids: list[int]
    sampling: SamplingParams
    cache: CacheConfig
    n: int = 1
    echo: str | None = None  # the prompt's text, put before each choice's text (completions' `echo`)

    def choices(self) -> list[SamplingParams]:
        """Sampling of each choice: a seeded request gives choice i the seed + i, so choices differ but repeat."""
        if self.n == 1 or self.sampling.seed is None:
            return [self.sampling] * self.n
        seed = self.sampling.seed
        return [self.sampling] + [self.sampling.model_copy(update={"seed": (seed + i) % 2**63}) for i in range(1, self.n)]


class Preparer:
    def __init__(self, engine: LLMEngine, model_name: str, settings: ServerSettings):
        self.engine = engine
        self.model_name = model_name
        self.settings = settings
        self.default_cache = engine.config.cache
        self.vocab_size = len(engine.tokenizer)
        self.trained_len = getattr(engine.loaded.model.config, "max_position_embeddings", None)
        # Requests are prepared on worker threads (tokenizing is slow for long prompts); one at a time, as a
        # fast tokenizer may adjust its settings in place while encoding.
        self._tokenizing = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._tokenizing:
            return self.engine.encode(text)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def completion(self, req: CompletionRequest) -> Prepared:
        self.check_model(req.model)
        if isinstance(req.prompt, str):
            ids = self.encode(req.prompt)
        else:
            bad = next((t for t in req.prompt if t >= self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary (size {self.vocab_size})",
                               "prompt", "invalid_value")
            ids = list(req.prompt)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported: this server does not score prompt tokens",
                           "echo", "unsupported_parameter")
        prepared = self._prepared(req, ids, "prompt", ("max_tokens", req.max_tokens), DEFAULT_COMPLETION_MAX_TOKENS,
                                  req.logprobs)
        if req.echo:
            prepared.echo = req.prompt if isinstance(req.prompt, str) else self.engine.tokenizer.decode(ids)
        return prepared

    def chat(self, req: ChatCompletionRequest) -> Prepared:
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        ids = self.encode_messages(req.messages)
        given = ("max_completion_tokens", req.max_completion_tokens) if req.max_completion_tokens else \
            ("max_tokens", req.max_tokens)
        return self._prepared(req, ids, "messages", given, DEFAULT_CHAT_MAX_TOKENS,
                              (req.top_logprobs or 0) if req.logprobs else None)

    def encode_messages(self, messages: list[ChatMessage]) -> list[int]:
        plain = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            with self._tokenizing:
                return self.engine.encode_chat(plain)
        except Exception as exc:  # the model's chat template rejects this conversation
            raise APIError(400, f"the chat template cannot render these messages: {exc}", "messages",
                           "invalid_value") from exc

    def length_limit(self, cache: CacheConfig) -> int | None:
        """Most prompt + generated tokens of one request: --max-model-len, else the trained length, except
        for bounded policies that number positions inside the cache (they run past it). A `full` cache
        also has to fit the pool's slot, whose columns are the largest budget (--max-budget)."""
        limit = self.settings.max_model_len
        if limit is None and not (cache.bounded and cache.position_mode == "cache"):
            limit = self.trained_len
        slot = getattr(self.engine, "budget", None)
        if not cache.bounded and slot is not None:
            limit = slot if limit is None else min(limit, slot)
        return limit

    def _prepared(self, req: SamplingFields, ids: list[int], field: str, given: tuple[str, int | None],
                  default_max: int, logprobs: int | None) -> Prepared:
        if not ids:
            raise APIError(400, "the prompt is empty", field, "invalid_value")
        limit = self.settings.max_prompt_tokens
        if len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's maximum is {limit} "
                           "(--max-prompt-tokens)", field, "context_length_exceeded")
        n = req.n or 1
        if n > self.settings.max_n:
            raise APIError(400, f"n is {n}; this server's maximum is {self.settings.max_n} (--max-n)", "n",
                           "invalid_value")
        cache = self.cache_config(req.slam)
        max_tokens = self._max_tokens(len(ids), given, default_max, cache, field)
        bad = next((t for t in req.stop_token_ids or [] if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (size {self.vocab_size})",
                           "stop_token_ids", "invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            sampling = SamplingParams(
                max_tokens=max_tokens,
                min_tokens=req.min_tokens or 0,
                temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's default
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                seed=None if req.seed is None else req.seed % 2**63,  # the sampler's seeds are int64
                stop=[s for s in stop if s],  # an empty stop string would end every request at once
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=bool(req.ignore_eos),
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0,
                logprobs=logprobs,
            )
        except ValidationError as exc:
            e = exc.errors()[0]
            message = str(e["msg"]).removeprefix("Value error, ")
            param = str(e["loc"][0]) if e["loc"] else "min_tokens" if "min_tokens" in message else None
            raise APIError(400, message, param, "invalid_value") from exc
        return Prepared(ids, sampling, cache, n)

    def _max_tokens(self, prompt: int, given: tuple[str, int | None], default: int, cache: CacheConfig,
                    field: str) -> int:
        name, asked = given
        limit = self.length_limit(cache)
        if limit is None:
            return asked or default
        room = limit - prompt
        if room < 1:
            raise APIError(400, f"the prompt has {prompt} tokens, which leaves no room to generate within this "
                           f"server's maximum of {limit} tokens for prompt + output (--max-model-len)", field,
                           "context_length_exceeded")
        if asked is None:
            return min(default, room)
        if asked > room:
            raise APIError(400, f"prompt ({prompt} tokens) + {name} ({asked}) = {prompt + asked} exceeds this "
                           f"server's maximum of {limit} tokens (--max-model-len)", name, "context_length_exceeded")
        return asked

    def cache_config(self, params: SlamCacheParams | None) -> CacheConfig:
        if params is None:
            return self.default_cache
        allowed = self.settings.policies
        if params.policy is not None and params.policy not in allowed:
            raise APIError(400, f"slam.policy: {params.policy!r} is not allowed on this server; choose from "
                           f"{', '.join(allowed)} (--allowed-policies)", "slam.policy", "invalid_value")
        merged = self.default_cache.model_dump()
        given = params.model_dump(exclude_none=True)
        merged.update(given)
        if merged["policy"] == "full" and "budget" not in given:
            merged["budget"] = None
        elif merged["budget"] is None:  # a bounded policy asked of a server that runs `full`
            merged["budget"] = min(CacheConfig.model_fields["budget"].default, self.settings.budget_limit)
        if merged["policy"] != "full" and merged["budget"] > self.settings.budget_limit:
            raise APIError(400, f"slam.budget: {merged['budget']} is above this server's maximum of "
                           f"{self.settings.budget_limit} (--max-budget)", "slam.budget", "invalid_value")
        try:
            return CacheConfig(**merged)
        except ValidationError as exc:
            message = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            raise APIError(400, f"slam: {message}", "slam", "invalid_value") from exc
