"""Needle in a haystack: hide a key in long essay text and ask for it at the end."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from slam.config import CacheConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams
from slam.eval.ruler import essay_ids
from slam.eval.split import SplitPrompt, encode_split, generate_split

DEFAULT_NEEDLE = "The secret passphrase is {key}. Remember it: {key}."
DEFAULT_QUESTION = "What is the secret passphrase? Answer with the number only."


@dataclass
class NiahCase:
    policy: str
    budget: int | None
    length: int
    depth: float
    seed: int
    key: str
    answer: str
    found: bool
    setting: str = "known"  # whether the question was part of the prefill that the cache compressed
    # slam's churn: critical tokens that entered the cache, summed over layers and KV heads, and the tokens
    # generated meanwhile (replacements / tokens / layers / heads: the churn per refresh at r = 1)
    replacements: int = 0
    tokens: int = 0
    # slam: whether the engine's pool scored the reserve in two stages (it starts them once the reserve is large
    # enough, engine/pool.py) or every token; None for the other policies.
    two_stage: bool | None = None


def needle_key(seed: int) -> str:
    return str(random.Random(seed).randint(10_000, 99_999))


def niah_prompt(engine: LLMEngine, length: int, depth: float, seed: int, needle: str, question: str) -> tuple[SplitPrompt, str]:
    """A prompt of about `length` tokens with the needle at `depth` of the haystack, and the needle's key."""
    key = needle_key(seed)
    needle_text = needle.format(key=key)
    shell = engine.encode_chat([{"role": "user", "content": f"\n\n{question}"}])
    hay_tokens = max(length - len(shell) - len(engine.encode(needle_text)) - 2, 16)
    corpus = essay_ids(engine.tokenizer)
    # Each seed reads a different stretch of the essays so that cases differ in more than the key.
    offset = (seed * 7919) % max(len(corpus) - hay_tokens, 1)
    hay = engine.tokenizer.decode(corpus[offset : offset + hay_tokens])
    cut = int(len(hay) * depth)
    sentence_end = hay.find(". ", cut)
    cut = sentence_end + 2 if 0 <= sentence_end < cut + 400 else cut
    return SplitPrompt(f"{hay[:cut]}{needle_text} {hay[cut:]}", f"\n\n{question}"), key


def build_prompt(engine: LLMEngine, length: int, depth: float, seed: int, needle: str, question: str) -> tuple[list[int], str]:
    """The question-known prompt's token ids: the chat template around the haystack and the question."""
    prompt, key = niah_prompt(engine, length, depth, seed, needle, question)
    return encode_split(engine.tokenizer, prompt, question_unseen=False).ids, key


def run_niah(
    engine: LLMEngine,
    caches: list[CacheConfig],
    lengths: list[int],
    depths: list[float],
    seeds: int = 1,
    needle: str = DEFAULT_NEEDLE,
    question: str = DEFAULT_QUESTION,
    max_tokens: int = 16,
    question_unseen: bool = False,
) -> Iterator[NiahCase]:
    """Each case once per cache; with `question_unseen` the context is compressed before the question arrives."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for length, depth, seed in itertools.product(lengths, depths, range(seeds)):
        prompt, key = niah_prompt(engine, length, depth, seed, needle, question)
        ids = encode_split(engine.tokenizer, prompt, question_unseen)
        for cache in caches:
            [seq] = generate_split(engine, [ids], sampling, cache, question_unseen)
            yield NiahCase(
                policy=cache.policy,
                budget=cache.budget,
                length=length,
                depth=depth,
                seed=seed,
                key=key,
                answer=seq.output_text.strip(),
                found=key in seq.output_text,
                setting="unseen" if question_unseen else "known",
                replacements=seq.replacements,
                tokens=len(seq.output_ids),
                two_stage=engine.runner.pool.two_stage if cache.policy == "slam" else None,
            )


def case_dict(case: NiahCase) -> dict:
    return asdict(case)
