"""How responses and SSE chunks of completions and chat completions look (OpenAI's shapes, logprobs too)."""

from __future__ import annotations

import time
from typing import Any

from slam.api.events import Stream, TokenEvent


class Shape:
    """The shape of one request's responses: completions or chat, with its id, model and options."""

    def __init__(self, chat: bool, request_id: str, model: str, tokenizer, echo: str | None = None):
        self.chat, self.id, self.model, self.created = chat, request_id, model, int(time.time())
        self.tokenizer, self.echo = tokenizer, echo
        self.offsets: dict[int, int] = {}  # completions' text_offset, per choice, while streaming

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # --- logprobs --------------------------------------------------------------------------------------
    def _chat_entry(self, event: TokenEvent) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        top = [entry(t, lp) for t, lp in event.top_logprobs or []]
        return {**entry(event.token_id, event.logprob), "top_logprobs": top}

    def logprobs(self, events: list[TokenEvent], choice: int = 0) -> dict[str, Any] | None:
        events = [e for e in events if e.logprob is not None and e.token_id >= 0]
        if not events:
            return None
        if self.chat:
            return {"content": [self._chat_entry(e) for e in events]}
        tokens, offsets = [], []
        offset = self.offsets.get(choice, len(self.echo or ""))
        for e in events:
            tokens.append(self._token(e.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        self.offsets[choice] = offset
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{self._token(t): lp for t, lp in e.top_logprobs or []} for e in events],
                "text_offset": offsets}

    # --- streaming -------------------------------------------------------------------------------------
    def chunk(self, event: TokenEvent, first: bool) -> dict[str, Any]:
        logprobs = self.logprobs([event], event.choice)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": event.text} if first else {"content": event.text}
            choice = {"index": event.choice, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        text = (self.echo or "") + event.text if first else event.text
        choice = {"index": event.choice, "text": text, "logprobs": logprobs, "finish_reason": event.finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}

    # --- whole responses -------------------------------------------------------------------------------
    def full(self, streams: list[Stream], events: dict[int, list[TokenEvent]]) -> dict[str, Any]:
        choices = []
        for s in streams:
            text, reason = s.seq.output_text, s.seq.finish_reason
            logprobs = self.logprobs(events.get(s.choice, []), s.choice)
            if self.chat:
                choices.append({"index": s.choice, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": reason})
            else:
                choices.append({"index": s.choice, "text": (self.echo or "") + text, "logprobs": logprobs,
                                "finish_reason": reason})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._base(obj), "choices": choices, "usage": usage(streams)}


def usage(streams: list[Stream]) -> dict[str, int]:
    prompt = len(streams[0].seq.prompt_ids)
    completion = sum(len(s.seq.output_ids) for s in streams)
    last = [s.last for s in streams if s.last is not None]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "cache_tokens": max((e.cache_tokens for e in last), default=0),
            "cache_bytes": sum(e.cache_bytes for e in last)}
