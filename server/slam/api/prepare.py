"""Turning a validated OpenAI request into what the engine takes: prompt ids, sampling, cache config.

Every check that can fail is done here, before the request reaches the engine thread, and fails as an
`APIError` (400/404) that names the offending field.
"""

from __future__ import annotations

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
from slam.config import CacheConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams


@dataclass
class Prepared:
    prompt_ids: list[int]
    sampling: SamplingParams
    cache: CacheConfig


class Preparer:
    def __init__(self, engine: LLMEngine, model_name: str, default_cache: CacheConfig, max_prompt_tokens: int):
        self.engine = engine
        self.model_name = model_name
        self.default_cache = default_cache
        self.max_prompt_tokens = max_prompt_tokens
        self.vocab_size = len(engine.tokenizer)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def completion(self, req: CompletionRequest) -> Prepared:
        self.check_model(req.model)
        if isinstance(req.prompt, str):
            ids = self.engine.encode(req.prompt)
        else:
            bad = next((t for t in req.prompt if t >= self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary (size {self.vocab_size})",
                               "prompt", "invalid_value")
            ids = list(req.prompt)
        return self._prepared(req, ids, "prompt", req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS)

    def chat(self, req: ChatCompletionRequest) -> Prepared:
        self.check_model(req.model)
        ids = self.encode_messages(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        return self._prepared(req, ids, "messages", max_tokens)

    def encode_messages(self, messages: list[ChatMessage]) -> list[int]:
        plain = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            return self.engine.encode_chat(plain)
        except Exception as exc:  # the model's chat template rejects this conversation
            raise APIError(400, f"the chat template cannot render these messages: {exc}", "messages",
                           "invalid_value") from exc

    def _prepared(self, req: SamplingFields, ids: list[int], field: str, max_tokens: int) -> Prepared:
        if not ids:
            raise APIError(400, "the prompt is empty", field, "invalid_value")
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's maximum is "
                           f"{self.max_prompt_tokens} (--max-prompt-tokens)", field, "context_length_exceeded")
        if req.n is not None and req.n != 1:
            raise APIError(400, f"n must be 1 (got {req.n}); ask once per completion", "n", "invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
            stop=[s for s in stop if s],  # an empty stop string would end every request at once
            ignore_eos=bool(req.ignore_eos),
        )
        return Prepared(ids, sampling, self.cache_config(req.slam))

    def cache_config(self, params: SlamCacheParams | None) -> CacheConfig:
        if params is None:
            return self.default_cache
        merged = self.default_cache.model_dump()
        given = params.model_dump(exclude_none=True)
        merged.update(given)
        if merged["policy"] == "full" and "budget" not in given:
            merged["budget"] = None
        elif merged["budget"] is None:  # a bounded policy asked of a server that runs `full`
            merged["budget"] = CacheConfig.model_fields["budget"].default
        try:
            return CacheConfig(**merged)
        except ValidationError as exc:
            message = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            raise APIError(400, f"slam: {message}", "slam", "invalid_value") from exc
