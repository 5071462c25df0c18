"""Request bodies of the OpenAI-compatible API, validated by pydantic.

Constraints mirror `SamplingParams` and `CacheConfig`, so a bad value is a 400 at the door and never an
exception inside the engine thread. A field this server does not implement (tools, response_format,
logit_bias, ...) is a 400 that names it, as OpenAI answers for fields it does not know, never silently
ignored; only fields that change nothing about the output (user, metadata, store, service_tier) are
accepted and ignored. Every string is checked for lone surrogates, which no tokenizer can encode.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# torch.Generator.manual_seed takes any value that fits in 64 bits, signed or unsigned.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
TokenId = Annotated[int, Field(ge=0)]
# Chat requests without max_tokens would otherwise run to the end of the context; OpenAI's legacy
# completions default is 16.
DEFAULT_CHAT_MAX_TOKENS = 512
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_LOGPROBS = 20


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode (a lone surrogate at character {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlamCacheParams(Body):
    """The `slam` extension field: this request's cache settings; absent fields take the server's."""

    policy: Text | None = None
    budget: int | None = Field(default=None, ge=1)
    sink: int | None = Field(default=None, ge=0)
    recent: int | None = Field(default=None, ge=1)


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    """Fields common to completions and chat completions."""

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)  # extension, 0: no cut
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    n: int | None = Field(default=None, ge=1, description="choices to generate, up to the server's --max-n")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # Extensions, as in vLLM.
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = False  # lets benchmarks generate exactly max_tokens
    slam: SlamCacheParams | None = None
    # Accepted and ignored: they change nothing about what is generated.
    user: Text | None = None
    metadata: dict[Text, Text] | None = None
    store: bool | None = None
    service_tier: Text | None = None


class CompletionRequest(SamplingFields):
    prompt: Text | list[TokenId] = Field(description="one prompt: a string or a list of token ids")
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="log-probabilities of the chosen and this many most likely tokens")


class ContentPart(Body):
    type: Literal["text"]
    text: Text


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(Body):
    """Either `prompt` (plain text) or `messages` (rendered with the chat template), not both."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int

