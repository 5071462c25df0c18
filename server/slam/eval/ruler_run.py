"""Running the RULER-style tasks on the engine, in the question-known or question-unseen setting."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

from slam.config import CacheConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams
from slam.eval.ruler import RulerSample, make_sample
from slam.eval.split import encode_split, generate_split


@dataclass
class RulerCase:
    task: str
    policy: str
    budget: int | None
    length: int
    seed: int
    setting: str  # "known" or "unseen": whether the question was in the prefill the cache compressed
    prompt_tokens: int
    answers: list[str]
    output: str
    score: float


def setting_name(question_unseen: bool) -> str:
    return "unseen" if question_unseen else "known"


def ruler_samples(tokenizer, tasks: list[str], lengths: list[int], seeds: int) -> list[RulerSample]:
    return [make_sample(tokenizer, t, n, s) for t in tasks for n in lengths for s in range(seeds)]


def run_ruler(
    engine: LLMEngine,
    caches: list[CacheConfig],
    samples: list[RulerSample],
    question_unseen: bool = False,
) -> Iterator[RulerCase]:
    prompts = [encode_split(engine.tokenizer, s.prompt, question_unseen) for s in samples]
    for cache in caches:
        for sample, prompt in zip(samples, prompts):
            sampling = SamplingParams(max_tokens=sample.max_tokens, temperature=0.0)
            [seq] = generate_split(engine, [prompt], sampling, cache, question_unseen)
            yield RulerCase(
                task=sample.task, policy=cache.policy, budget=cache.budget, length=sample.length, seed=sample.seed,
                setting=setting_name(question_unseen), prompt_tokens=len(prompt.ids), answers=sample.answers,
                output=seq.output_text, score=sample.score(seq.output_text),
            )


def summarize(cases: list[RulerCase]) -> dict:
    """Mean score (0-100) per method and task, and the average over tasks, per setting and length."""
    out: dict = {}
    for case in cases:
        method = case.policy + (f"/{case.budget}" if case.budget else "")
        row = out.setdefault(case.setting, {}).setdefault(method, {}).setdefault(str(case.length), {})
        row.setdefault(case.task, []).append(case.score)
    for setting in out.values():
        for method in setting.values():
            for length, tasks in method.items():
                means = {t: round(100 * sum(s) / len(s), 2) for t, s in tasks.items()}
                method[length] = means | {"average": round(sum(means.values()) / len(means), 2)}
    return out


def case_dict(case: RulerCase) -> dict:
    return asdict(case)
