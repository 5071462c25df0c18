"""RULER-style tasks: deterministic for a seed, answers that the prompt really holds, RULER's string match."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from slam.config import CacheConfig
from slam.eval.ruler import TASKS, make_sample, string_match
from slam.eval.ruler_run import ruler_samples, run_ruler, summarize
from slam.eval.split import encode_split

from tests.conftest import make_engine
from tests.test_cli import run


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny.tokenizer


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_sample_other_seed_other_sample(tokenizer, task):
    a, b = make_sample(tokenizer, task, 600, 3), make_sample(tokenizer, task, 600, 3)
    assert a == b and a.answers == b.answers
    other = make_sample(tokenizer, task, 600, 4)
    assert other.prompt != a.prompt and other.answers != a.answers


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [500, 2000])
def test_prompt_length_is_near_the_target(tokenizer, task, length):
    ids = encode_split(tokenizer, make_sample(tokenizer, task, length, 0).prompt, question_unseen=True).ids
    assert 0.85 * length <= len(ids) <= 1.05 * length


def test_multikey_needles_hold_the_answer_under_the_asked_key(tokenizer):
    sample = make_sample(tokenizer, "niah_multikey", 1000, 1)
    needles = dict(re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", sample.prompt.context))
    assert len(needles) == 4
    asked = re.search(r"number for (\S+) mentioned", sample.prompt.question).group(1)
    assert sample.answers == [needles[asked]]
    assert asked in sample.prompt.answer_prefix


def test_multivalue_needles_are_all_the_answers(tokenizer):
    sample = make_sample(tokenizer, "niah_multivalue", 1000, 2)
    found = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", sample.prompt.context)
    assert {k for k, _ in found} == {re.search(r"numbers for (\S+) mentioned", sample.prompt.question).group(1)}
    assert sorted(v for _, v in found) == sorted(sample.answers) and len(sample.answers) == 4


def test_variable_tracking_answers_are_the_variables_holding_the_asked_value(tokenizer):
    sample = make_sample(tokenizer, "vt", 1000, 5)
    value = re.search(r"assigned the value (\d+)", sample.prompt.question).group(1)
    values: dict[str, str] = {}
    for name, source in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", sample.prompt.context):
        # Following the assignments in text order must resolve each chain: a variable is defined before use.
        values[name] = values[source[4:]] if source.startswith("VAR ") else source
    assert sorted(n for n, v in values.items() if v == value) == sorted(sample.answers)
    assert len(values) == 2 * len(sample.answers)  # the second chain is a distractor with another value
    assert f"{len(sample.answers)} variables" in sample.prompt.answer_prefix


def test_common_words_are_strictly_the_most_frequent(tokenizer):
    sample = make_sample(tokenizer, "cwe", 1500, 0)
    words = re.findall(r"\d+\. (\w+)", sample.prompt.context)
    counts = Counter(words).most_common()
    top = {w for w, _ in counts[:10]}
    assert top == set(sample.answers)
    assert counts[9][1] > counts[10][1]  # the tenth common word beats every other word
    assert [int(n) for n in re.findall(r"(\d+)\. \w+", sample.prompt.context)] == list(range(1, len(words) + 1))


def test_string_match_is_the_share_of_answers_found_ignoring_case():
    assert string_match("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0
    assert string_match("", ["1"]) == 0.0


@pytest.mark.parametrize("task", list(TASKS))
def test_an_output_listing_the_answers_scores_one(tokenizer, task):
    sample = make_sample(tokenizer, task, 500, 0)
    assert sample.score(" " + ", ".join(sample.answers)) == 1.0
    assert sample.score(" I do not know.") == 0.0


def test_run_known_setting_on_the_tiny_model(tiny):
    engine = make_engine(tiny, "full")
    samples = ruler_samples(engine.tokenizer, list(TASKS), [200], seeds=1)
    caches = [CacheConfig(policy="full", budget=None), CacheConfig(policy="streaming", budget=48, sink=4, recent=16)]
    cases = list(run_ruler(engine, caches, samples, question_unseen=False))
    assert len(cases) == len(TASKS) * 2
    assert all(0.0 <= c.score <= 1.0 and c.setting == "known" for c in cases)
    summary = summarize(cases)
    assert set(summary["known"]) == {"full", "streaming/48"}
    assert set(summary["known"]["full"]["200"]) == set(TASKS) | {"average"}


def test_cli_json_and_plot(tiny_dir, tmp_path):
    plot = tmp_path / "ruler.png"
    result = run("eval", "ruler", "--model", str(tiny_dir), "--tasks", "niah_multikey,vt", "--policies",
                 "full,slam", "--budgets", "48", "--sink", "4", "--recent", "16", "--lengths", "128,192",
                 "--seeds", "1", "--json", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    cases, summary = rows[:-1], rows[-1]["summary"]
    assert len(cases) == 2 * 2 * 2  # tasks x lengths x methods
    assert {(c["policy"], c["budget"]) for c in cases} == {("full", None), ("slam", 48)}
    assert set(summary["known"]["slam/48"]) == {"128", "192"}
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_plot_with_one_length_draws_bars(tmp_path):
    from slam.eval.plots import ruler_lines, ruler_scores
    from slam.eval.ruler_run import RulerCase

    def case(task, policy, budget, score):
        return RulerCase(task, policy, budget, 1000, 0, "unseen", 1000, ["1"], "", score)

    cases = [case("vt", "slam", 256, 1.0), case("vt", "slam", 256, 0.5), case("cwe", "slam", 256, 0.0),
             case("vt", "kvpress:snapkv", 256, 0.0), case("cwe", "kvpress:snapkv", 256, 0.2)]
    scores = ruler_scores(cases, ["vt", "cwe", "average"], ["slam/256", "kvpress:snapkv/256"], [1000])
    assert scores["vt"]["slam/256"] == [75.0] and scores["average"]["slam/256"] == [37.5]
    assert scores["average"]["kvpress:snapkv/256"] == [10.0]
    ruler_lines(cases, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
