"""The LongBench harness end to end on small hand-made files, with the tiny random model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from slam.cli import main
from slam.config import CacheConfig
from slam.eval.longbench import (
    LongBenchDataError,
    build_prompt,
    length_buckets,
    prepare,
    read_records,
    resolve_tasks,
    run_longbench,
    summarize,
)
from slam.eval.longbench_tasks import MAX_NEW_TOKENS, PROMPTS, TASKS

from tests.conftest import make_engine
from tests.test_cli import run

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"


@pytest.fixture(scope="module")
def engine(tiny):
    return make_engine(tiny, "full")


def test_prompt_is_cut_in_the_middle_and_wrapped_in_the_chat_template(engine):
    [_, long] = read_records(FIXTURES / "narrativeqa.jsonl")
    tokenizer = engine.tokenizer
    plain = tokenizer.encode(PROMPTS["narrativeqa"].format(context=long["context"], input=long["input"]))
    assert len(plain) > 400
    ids = build_prompt(tokenizer, "narrativeqa", long, max_length=100)
    text = tokenizer.decode(ids)
    chat = engine.encode_chat([{"role": "user", "content": "x"}])
    assert len(chat) < len(ids) <= 100 + len(chat) + 2  # the kept half of each side, plus the template
    assert text.startswith(tokenizer.decode(chat[:3]))  # the chat template's opening
    assert "You are given a story" in text  # the start of the prompt survives...
    assert "Where is the lighthouse?\n\nAnswer:" in text  # ...and so does its end
    assert tokenizer.decode(plain[:50]) in text and tokenizer.decode(plain[-50:]) in text
    assert tokenizer.decode(plain[200:230]) not in text  # the middle went


def test_few_shot_and_code_tasks_get_no_chat_template(engine):
    [record] = read_records(FIXTURES / "lcc.jsonl")
    ids = build_prompt(engine.tokenizer, "lcc", record, max_length=10_000)
    assert ids == engine.tokenizer.encode(PROMPTS["lcc"].format(context=record["context"], input=record["input"]))


def test_harness_runs_every_task_and_scores_with_the_official_metrics(engine):
    files = resolve_tasks(FIXTURES, None)
    assert list(files) == TASKS  # a fixture for every English task
    caches = [CacheConfig(policy="full", budget=None), CacheConfig(policy="slam", budget=48, sink=4, recent=16)]
    samples = list(run_longbench(engine, caches, prepare(engine.tokenizer, files, max_length=200, limit=1)))
    assert len(samples) == len(TASKS) * 2
    for sample in samples:
        assert 0.0 <= sample.score <= 1.0
        assert 1 <= sample.generated_tokens <= MAX_NEW_TOKENS[sample.task]
        assert sample.prompt_tokens <= 200 + 40
    summary = summarize(samples)
    assert set(summary) == {"full", "slam/48"}
    for method in summary.values():
        assert list(method["tasks"]) == TASKS
        assert method["average"] == round(sum(method["tasks"].values()) / len(TASKS), 2)
        assert list(method["length_buckets"]) == TASKS
        assert all(set(b) <= {"0-4k", "4-8k", "8k+"} for b in method["length_buckets"].values())


def test_bad_data_is_reported_with_file_and_line(tmp_path):
    with pytest.raises(LongBenchDataError, match="is not a directory"):
        resolve_tasks(tmp_path / "missing", None)
    with pytest.raises(LongBenchDataError, match="no LongBench task files"):
        resolve_tasks(tmp_path, None)
    with pytest.raises(LongBenchDataError, match="unknown task 'bogus'"):
        resolve_tasks(FIXTURES, ["bogus"])
    with pytest.raises(LongBenchDataError, match="only the English tasks"):
        resolve_tasks(FIXTURES, ["dureader"])
    bad = tmp_path / "hotpotqa.jsonl"
    bad.write_text(json.dumps({"input": "q", "context": "c", "answers": ["a"]}) + "\n{not json\n")
    with pytest.raises(LongBenchDataError, match=r"hotpotqa.jsonl:2: not JSON"):
        read_records(bad)
    bad.write_text(json.dumps({"input": "q", "context": "c"}) + "\n")
    with pytest.raises(LongBenchDataError, match=r"hotpotqa.jsonl:1: missing field 'answers'"):
        read_records(bad)
    with pytest.raises(LongBenchDataError, match="no qasper.jsonl"):
        resolve_tasks(tmp_path, ["qasper"])


def test_length_buckets_follow_longbench_e():
    scores = [(100, 1.0), (3999, 0.0), (4000, 0.5), (9000, 1.0), (None, 1.0)]
    assert length_buckets(scores) == {"0-4k": 50.0, "4-8k": 50.0, "8k+": 100.0}


def test_longbench_e_file_names_are_found(tmp_path):
    shutil.copy(FIXTURES / "trec.jsonl", tmp_path / "trec_e.jsonl")
    assert resolve_tasks(tmp_path, None) == {"trec": tmp_path / "trec_e.jsonl"}


def test_cli_json_and_plot(tiny_dir, tmp_path):
    plot = tmp_path / "longbench.png"
    result = run("eval", "longbench", "--data", str(FIXTURES), "--model", str(tiny_dir), "--policies",
                 "full,streaming", "--budget", "48", "--sink", "4", "--recent", "16", "--max-length", "200",
                 "--tasks", "hotpotqa,trec", "--json", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    samples, [summary] = rows[:-1], rows[-1:]
    assert len(samples) == (1 + 2) * 2  # records per task x policies
    assert {"task", "policy", "budget", "id", "prediction", "score"} <= samples[0].keys()
    assert set(summary["summary"]) == {"full", "streaming/48"}
    assert list(summary["summary"]["full"]["tasks"]) == ["hotpotqa", "trec"]
    assert summary["max_length"] == 200
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_table(tiny_dir, capsys):
    code = main(["eval", "longbench", "--data", str(FIXTURES), "--model", str(tiny_dir), "--policies", "full",
                 "--max-length", "200", "--tasks", "passage_count", "--limit", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "passage_count" in out and "average" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data", "/nonexistent"], "--data: /nonexistent is not a directory"),
        (["--data", str(FIXTURES), "--tasks", "bogus"], "--tasks: unknown task 'bogus'"),
        (["--data", str(FIXTURES), "--max-length", "4"], "--max-length: must be at least 16"),
        (["--data", str(FIXTURES), "--limit", "0"], "--limit: must be at least 1"),
    ],
)
def test_cli_bad_input_names_the_flag(extra, message, capsys):
    assert main(["eval", "longbench", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
