"""LongBench on the engine: the user's JSONL files, the official prompts and truncation, the official scores.

Prompts are built as the official pred.py builds them: the task template filled with the record, cut in
the middle to `max_length` tokens when longer (both sides may hold instructions), then wrapped in the
model's chat template except for the few-shot and code tasks. Decoding is greedy for the task's length.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from slam.config import CacheConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams
from slam.eval.longbench_metrics import score_sample, score_task
from slam.eval.longbench_tasks import CHINESE_TASKS, MAX_NEW_TOKENS, NO_CHAT_TASKS, PROMPTS, TASKS

REQUIRED_FIELDS = ("input", "context", "answers")
LENGTH_BUCKETS = (("0-4k", 4000), ("4-8k", 8000), ("8k+", float("inf")))  # LongBench-E's


class LongBenchDataError(ValueError):
    """The data directory or a record in it is unusable; the message names the file and line."""


@dataclass
class LongBenchSample:
    task: str
    policy: str
    budget: int | None
    id: str
    length: int | None
    prompt_tokens: int
    generated_tokens: int
    prediction: str
    score: float


def task_file(data: Path, task: str) -> Path | None:
    """A task's file: `<task>.jsonl`, else LongBench-E's `<task>_e.jsonl`."""
    for name in (f"{task}.jsonl", f"{task}_e.jsonl"):
        if (data / name).is_file():
            return data / name
    return None


def resolve_tasks(data: Path, requested: list[str] | None) -> dict[str, Path]:
    if not data.is_dir():
        raise LongBenchDataError(f"{data} is not a directory")
    for task in requested or []:
        if task in CHINESE_TASKS:
            raise LongBenchDataError(f"task {task!r} is Chinese; only the English tasks are supported")
        if task not in PROMPTS:
            raise LongBenchDataError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    files = {task: task_file(data, task) for task in (requested or TASKS)}
    missing = [task for task, path in files.items() if path is None]
    if requested and missing:
        raise LongBenchDataError(f"no {missing[0]}.jsonl (or {missing[0]}_e.jsonl) in {data}")
    found = {task: path for task, path in files.items() if path is not None}
    if not found:
        raise LongBenchDataError(f"no LongBench task files (e.g. hotpotqa.jsonl) in {data}")
    return found


def read_records(path: Path, limit: int | None = None) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LongBenchDataError(f"{path}:{number}: not JSON ({e.msg})") from None
            missing = [k for k in REQUIRED_FIELDS if k not in record]
            if missing:
                raise LongBenchDataError(f"{path}:{number}: missing field {missing[0]!r}")
            if not isinstance(record["answers"], list) or not record["answers"]:
                raise LongBenchDataError(f"{path}:{number}: 'answers' must be a non-empty list")
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise LongBenchDataError(f"{path} has no records")
    return records


def build_prompt(tokenizer, task: str, record: dict, max_length: int) -> list[int]:
    prompt = PROMPTS[task].format(context=record["context"], input=record["input"])
    ids = tokenizer.encode(prompt)
    if len(ids) > max_length:
        half = max_length // 2
        prompt = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
            ids[-half:], skip_special_tokens=True
        )
    if task not in NO_CHAT_TASKS and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return tokenizer.encode(prompt)


def default_max_length(loaded) -> int:
    """The model's trained length less the longest answer, as the official model2maxlen values are set."""
    trained = getattr(loaded.model.config, "max_position_embeddings", 4096)
    return max(trained - max(MAX_NEW_TOKENS.values()), 256)


@dataclass
class TaskPrompts:
    task: str
    records: list[dict]
    prompts: list[list[int]]

    @property
    def longest_request(self) -> int:
        return max(len(p) for p in self.prompts) + MAX_NEW_TOKENS[self.task]


def prepare(tokenizer, files: dict[str, Path], max_length: int, limit: int | None = None) -> list[TaskPrompts]:
    """Each task's records and prompts, built before any engine so that it can be sized for them."""
    out = []
    for task, path in files.items():
        records = read_records(path, limit)
        out.append(TaskPrompts(task, records, [build_prompt(tokenizer, task, r, max_length) for r in records]))
    return out


def run_longbench(engine: LLMEngine, caches: list[CacheConfig], tasks: list[TaskPrompts]) -> Iterator[LongBenchSample]:
    for task, records, prompts in ((t.task, t.records, t.prompts) for t in tasks):
        sampling = SamplingParams(max_tokens=MAX_NEW_TOKENS[task], temperature=0.0)
        for cache in caches:
            seqs = engine.generate(prompts, sampling, cache)
            for record, prompt, seq in zip(records, prompts, seqs):
                prediction = seq.output_text
                yield LongBenchSample(
                    task=task, policy=cache.policy, budget=cache.budget, id=str(record.get("_id", "")),
                    length=record.get("length"), prompt_tokens=len(prompt), generated_tokens=len(seq.output_ids),
                    prediction=prediction,
                    score=score_sample(task, prediction, record["answers"], record.get("all_classes")),
                )


def length_buckets(scores: list[tuple[int | None, float]]) -> dict[str, float]:
    """LongBench-E's scores by the records' `length` field: 0-4k, 4-8k and 8k+ (empty buckets left out)."""
    out, low = {}, 0
    for name, high in LENGTH_BUCKETS:
        inside = [score for length, score in scores if length is not None and low <= length < high]
        if inside:
            out[name] = score_task(inside)
        low = high
    return out


def summarize(samples: list[LongBenchSample]) -> dict:
    """Per (policy, budget): each task's score (0-100), their average, and each task's length buckets."""
    out: dict = {}
    for key in dict.fromkeys((s.policy, s.budget) for s in samples):
        mine = [s for s in samples if (s.policy, s.budget) == key]
        names = list(dict.fromkeys(s.task for s in mine))
        tasks = {t: score_task([s.score for s in mine if s.task == t]) for t in names}
        buckets = {t: length_buckets([(s.length, s.score) for s in mine if s.task == t]) for t in names}
        out[f"{key[0]}" + (f"/{key[1]}" if key[1] else "")] = {
            "policy": key[0], "budget": key[1], "tasks": tasks,
            "average": round(sum(tasks.values()) / len(tasks), 2), "length_buckets": buckets,
        }
    return out


def sample_dict(sample: LongBenchSample) -> dict:
    return asdict(sample)
