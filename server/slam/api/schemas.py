"""Request bodies of the OpenAI-compatible API, validated by pydantic.

Constraints mirror `SamplingParams` and `CacheConfig`, so a bad value is a 400 at the door and never an
exception inside the engine thread. Unknown OpenAI fields (user, logprobs, ...) are accepted and ignored,
as OpenAI's own clients send some of them by default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# torch.Generator.manual_seed takes any value that fits in 64 bits, signed or unsigned.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
TokenId = Annotated[int, Field(ge=0)]
# Chat requests without max_tokens would otherwise run to the end of the context; OpenAI's legacy
# completions default is 16.
DEFAULT_CHAT_MAX_TOKENS = 512
DEFAULT_COMPLETION_MAX_TOKENS = 16


class SlamCacheParams(BaseModel):
    """The `slam` extension field: this request's cache settings; absent fields take the server's."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = None
    budget: int | None = Field(default=None, ge=1)
    sink: int | None = Field(default=None, ge=0)
    recent: int | None = Field(default=None, ge=1)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension, 0: no cut
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # extension (as in vLLM): lets benchmarks generate exactly max_tokens
    slam: SlamCacheParams | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[TokenId] = Field(description="one prompt: a string or a list of token ids")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class TokenizeRequest(BaseModel):
    """Either `prompt` (plain text) or `messages` (rendered with the chat template), not both."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
