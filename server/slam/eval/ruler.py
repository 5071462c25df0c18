"""RULER-style synthetic tasks over the essays: multi-key and multi-value needles, variable tracking and
common-word extraction. Every sample is a function of (task, length, seed) and carries its answers.

The score is RULER's string match: the share of a sample's answers found in the output, ignoring case.
Wording follows RULER's templates; the haystack is essay text (RULER's "essay" noise).
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from slam.eval.corpus import essays_text
from slam.eval.split import SplitPrompt

NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.\n")


@dataclass(frozen=True)
class RulerSample:
    task: str
    length: int
    seed: int
    prompt: SplitPrompt
    answers: list[str] = field(hash=False)
    max_tokens: int

    def score(self, output: str) -> float:
        return string_match(output, self.answers)


def string_match(output: str, answers: list[str]) -> float:
    """RULER's string_match_all: the share of answers that occur in the output, case-insensitive."""
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


@lru_cache(maxsize=1)
def essay_words() -> list[str]:
    """Distinct plain words of the essays, sorted so that a seed picks the same ones everywhere."""
    return sorted(set(re.findall(r"\b[a-z]{4,10}\b", essays_text())))


@lru_cache(maxsize=4)
def essay_ids(tokenizer) -> list[int]:
    return tokenizer.encode(essays_text(), add_special_tokens=False)


def count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def haystack(tokenizer, tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of essay text from a place the seed picks."""
    ids = essay_ids(tokenizer)
    tokens = max(tokens, 8)
    if tokens >= len(ids):  # longer than all the essays: they repeat
        ids = ids * (tokens // len(ids) + 2)
    start = rng.randrange(max(len(ids) - tokens, 1))
    return tokenizer.decode(ids[start : start + tokens])


def insert_sentences(hay: str, sentences: list[str], rng: random.Random) -> str:
    """Insert each sentence after a sentence end of the haystack (or its start), in order of appearance."""
    ends = [0] + [m.end() for m in re.finditer(r"[.!?]\s+", hay)]
    cuts = sorted(rng.choice(ends) for _ in sentences)
    out, last = [], 0
    for cut, sentence in zip(cuts, sentences):
        out += [hay[last:cut], sentence + " "]
        last = cut
    return "".join(out + [hay[last:]])


def fill(tokenizer, length: int, rng: random.Random, fixed: str, sentences: list[str]) -> str:
    """Essay text with the sentences inside, so that it and the fixed parts take about `length` tokens."""
    used = count(tokenizer, fixed) + sum(count(tokenizer, s) + 1 for s in sentences) + 16
    return insert_sentences(haystack(tokenizer, length - used, rng), sentences, rng)


def word_key(rng: random.Random) -> str:
    words = essay_words()
    return f"{rng.choice(words)}-{rng.choice(words)}"


def number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def niah_multikey(tokenizer, length: int, rng: random.Random, needles: int = 4) -> tuple[SplitPrompt, list[str], int]:
    """Several needles with different keys; the question asks for one key's number."""
    keys = [word_key(rng) for _ in range(needles)]
    values = [number(rng) for _ in range(needles)]
    asked = rng.randrange(needles)
    question = f"\nWhat is the special magic number for {keys[asked]} mentioned in the provided text?"
    prefix = f" The special magic number for {keys[asked]} mentioned in the provided text is"
    sentences = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    hay = fill(tokenizer, length, rng, NEEDLE_INTRO + question + prefix, sentences)
    return SplitPrompt(NEEDLE_INTRO + hay, question, prefix), [values[asked]], 24


def niah_multivalue(tokenizer, length: int, rng: random.Random, values: int = 4) -> tuple[SplitPrompt, list[str], int]:
    """One key with several numbers; the question asks for all of them."""
    key = word_key(rng)
    numbers = [number(rng) for _ in range(values)]
    question = f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?"
    prefix = f" The special magic numbers for {key} mentioned in the provided text are"
    sentences = [f"One of the special magic numbers for {key} is: {v}." for v in numbers]
    hay = fill(tokenizer, length, rng, NEEDLE_INTRO + question + prefix, sentences)
    return SplitPrompt(NEEDLE_INTRO + hay, question, prefix), numbers, 16 * values


def variable_tracking(tokenizer, length: int, rng: random.Random, hops: int = 4) -> tuple[SplitPrompt, list[str], int]:
    """A chain VAR A = 12345, VAR B = VAR A, ...; the question asks for every variable holding the value.

    A second chain with another value is a distractor, as in RULER's multi-chain variant."""
    names: list[str] = []
    while len(names) < 2 * (hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [] if name in names else [name]
    chains = []
    for c in range(2):
        chain, value = names[c * (hops + 1) : (c + 1) * (hops + 1)], str(rng.randint(10_000, 99_999))
        lines = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)]
        chains.append((chain, value, lines))
    # The chains interleave at random; each keeps its own order.
    turns = [0] * (hops + 1) + [1] * (hops + 1)
    rng.shuffle(turns)
    pending = [list(chains[0][2]), list(chains[1][2])]
    ordered = [pending[t].pop(0) for t in turns]
    chain, value, _ = chains[0]
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
              f"are assigned the value {value}, they are:")
    hay = fill(tokenizer, length, rng, intro + question + prefix, ordered)
    return SplitPrompt(intro + hay, question, prefix), chain, 8 * (hops + 1)


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_plan(items: int, common: int, freq_common: int, freq_rare: int, available: int) -> tuple[int, int, int]:
    """(common words' frequency, rare words' frequency, rare words) for a list of about `items` entries.

    Short lists lower the common frequency, keeping it above the rare one; lists longer than the essays'
    vocabulary allows raise the rare frequency, and the common one with it."""
    freq_common = max(freq_rare + 1, min(freq_common, items // (2 * common)))
    slots = max(items - common * freq_common, 0)
    freq_rare = max(freq_rare, -(-slots // available))
    return max(freq_common, freq_rare + 1), freq_rare, min(slots // freq_rare, available)


def common_words(tokenizer, length: int, rng: random.Random, common: int = 10,
                 freq_common: int = 30, freq_rare: int = 3) -> tuple[SplitPrompt, list[str], int]:
    """A numbered list of essay words in which `common` words appear more often than all others."""
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
    question = f"\nQuestion: What are the {common} most common words in the above list?"
    prefix = f" Answer: The top {common} words that appear most often in the list are:"
    room = length - count(tokenizer, intro + question + prefix) - 16
    vocabulary = essay_words()
    items = max(room // 4, common * (freq_rare + 2))
    for _ in range(4):  # guess the entries that fit, build, measure, rescale
        f_common, f_rare, rare = cwe_plan(items, common, freq_common, freq_rare, len(vocabulary) - common)
        words = rng.sample(vocabulary, common + rare)
        listed = words[:common] * f_common + words[common:] * f_rare
        rng.shuffle(listed)
        context = numbered(listed)
        used = count(tokenizer, context)
        if abs(used - room) <= 0.02 * room or (used < room and rare == 0):
            break
        items = max(int(len(listed) * room / used), common * (freq_rare + 2))
    return SplitPrompt(intro + context, question, prefix), words[:common], 12 * common


TASKS: dict[str, Callable] = {
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "vt": variable_tracking,
    "cwe": common_words,
}


def make_sample(tokenizer, task: str, length: int, seed: int) -> RulerSample:
    """The sample of `task` at about `length` tokens for `seed`; the same arguments give the same sample."""
    rng = random.Random(f"{task}/{length}/{seed}")
    prompt, answers, max_tokens = TASKS[task](tokenizer, length, rng)
    return RulerSample(task, length, seed, prompt, list(answers), max_tokens)
