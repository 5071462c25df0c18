"""Prompts in two parts, context then question, and the one place evaluations depend on the engine for
the question-unseen setting.

The parts are cut exactly where kvpress's pipeline cuts them, so that both see the same tokens: the
context part is the chat template's opening plus the context; the question part is the question, the
template's closing and generation prompt, and the answer prefix. In the question-known setting the question
text moves to the end of the context part (kvpress then gets `question=""`); our engine then prefills the
whole prompt as usual. In the unseen setting the engine must compress the context before it sees a single
question token: `LLMEngine.add_request(..., prefill_boundaries=[len(context_ids)])`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine pulls in torch; building prompts and the CLI's parsers must not
    from slam.config import CacheConfig
    from slam.engine.engine import LLMEngine
    from slam.engine.sequence import SamplingParams, Sequence

BOUNDARY_HOOK = "prefill_boundaries"


class EngineHookMissing(RuntimeError):
    """The engine cannot keep the question out of the context's prefill chunks."""


@dataclass(frozen=True)
class SplitPrompt:
    context: str  # the long text, with any task instructions that come before it
    question: str
    answer_prefix: str = ""


@dataclass(frozen=True)
class SplitIds:
    context_ids: list[int]
    question_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.question_ids

    @property
    def boundary(self) -> int:
        return len(self.context_ids)


def chat_parts(tokenizer, context: str) -> tuple[str, str]:
    """(chat opening + context, chat closing) around a user turn, as kvpress's pipeline splits them."""
    if getattr(tokenizer, "chat_template", None) is None:
        return (tokenizer.bos_token or "") + context, "\n"
    separator = "#" * (len(context) + 10)  # cannot occur inside the context, which is shorter
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + separator}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(separator)
    return head, tail


def encode_split(tokenizer, prompt: SplitPrompt, question_unseen: bool) -> SplitIds:
    context, question = prompt.context, prompt.question
    if not question_unseen:
        context, question = context + question, ""
    head, tail = chat_parts(tokenizer, context)
    return SplitIds(
        tokenizer.encode(head, add_special_tokens=False),
        tokenizer.encode(question + tail + prompt.answer_prefix, add_special_tokens=False),
    )


def engine_has_boundaries(engine: LLMEngine) -> bool:
    return BOUNDARY_HOOK in inspect.signature(engine.add_request).parameters


def require_boundaries(engine: LLMEngine) -> None:
    if not engine_has_boundaries(engine):
        raise EngineHookMissing(
            "the question-unseen setting needs LLMEngine.add_request(..., prefill_boundaries=[n]) so that the "
            "context is prefilled and compressed before the question; this engine has no such parameter"
        )


def generate_split(
    engine: LLMEngine,
    prompts: Seq[SplitIds],
    sampling: SamplingParams,
    cache: CacheConfig,
    question_unseen: bool,
) -> list[Sequence]:
    """Generate for each prompt; when the question is unseen, no prefill chunk spans the boundary."""
    from slam.engine.sequence import Status

    if not question_unseen:
        return engine.generate([p.ids for p in prompts], sampling, cache)
    require_boundaries(engine)
    seqs = [
        engine.add_request(p.ids, sampling, cache, **{BOUNDARY_HOOK: [p.boundary]}) for p in prompts
    ]
    while any(s.status is not Status.FINISHED for s in seqs):
        engine.step()
    return seqs
