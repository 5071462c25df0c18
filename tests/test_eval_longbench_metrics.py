"""LongBench's metrics on hand-made examples whose scores are worked out in the comments."""

from __future__ import annotations

import pytest
from slam.eval.longbench_metrics import (
    DATASET_METRIC,
    classification_score,
    code_sim_score,
    count_score,
    edit_similarity,
    first_code_line,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_score,
    score_sample,
    score_task,
)
from slam.eval.longbench_tasks import MAX_NEW_TOKENS, PROMPTS

TREC = ["Abbreviation", "Entity", "Description and abstract concept", "Human being", "Location", "Numeric value"]


def test_normalize_answer_lowers_drops_punctuation_articles_and_spaces():
    assert normalize_answer("  An apple, the PIE!  ") == "apple pie"
    assert normalize_answer("A.B") == "ab"  # punctuation goes first, so "a" is no longer a word here
    assert normalize_answer("Theory of the a") == "theory of"


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        ("The Eiffel Tower, Paris.", "Eiffel Tower", 0.8),  # 2 common; P 2/3, R 1: 2*(2/3)/(5/3)
        ("cat cat dog", "cat cat cat", 2 / 3),  # counts clip: 2 common; P 2/3, R 2/3
        ("yes", "no", 0.0),
        ("The", "the answer", 0.0),  # the prediction normalizes to nothing
        ("Paris", "paris.", 1.0),
    ],
)
def test_qa_f1(prediction, reference, expected):
    assert qa_f1_score(prediction, reference) == pytest.approx(expected)


def test_rouge_l_uses_the_rouge_package_and_its_unique_word_counts():
    # LCS "the cat sat" = 3 words; the package divides by unique words: reference {the, cat, sat, on, mat} = 5.
    # P = 3/3, R = 3/5, F = 2PR/(P+R) = 0.75.
    assert rouge_score("the cat sat", "the cat sat on the mat") == pytest.approx(0.75, abs=1e-6)
    # LCS "a b d" = 3 of 4 words each way: P = R = F = 0.75.
    assert rouge_score("a b c d", "a b e d") == pytest.approx(0.75, abs=1e-6)
    assert rouge_score("", "anything") == 0.0  # the package raises on an empty hypothesis
    assert rouge_score("...", "anything") == 0.0


def test_classification_score():
    assert classification_score("Location", "Location", all_classes=TREC) == 1.0
    assert classification_score("Entity or Location", "Location", all_classes=TREC) == 0.5
    assert classification_score("Human", "Human being", all_classes=TREC) == 0.0
    # "ball" is inside the reference "football", so it does not count against it.
    assert classification_score("football", "football", all_classes=["ball", "football"]) == 1.0


def test_classification_score_keeps_the_official_skip_after_a_removal():
    # Found: [ball, all, football]. Removing "ball" shifts "all" into the examined slot, so the official loop
    # never examines "all" (also inside "football"): the list ends as [all, football] and the score is 1/2.
    assert classification_score("football", "football", all_classes=["ball", "all", "football"]) == 0.5


def test_retrieval_and_count_scores_are_shares_of_the_numbers_given():
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert retrieval_score("I do not know", "Paragraph 12") == 0.0
    assert retrieval_score("Paragraph 112", "Paragraph 12") == 0.0  # whole numbers, not digits
    assert count_score("There are 7 unique paragraphs, so 7.", "7") == 1.0
    assert count_score("5 or 7", "7") == 0.5
    assert count_score("seven", "7") == 0.0


def test_code_similarity_on_the_first_code_line():
    assert first_code_line("\n```python\n# comment\nx = foo(a, b)\n```") == "x = foo(a, b)"
    assert first_code_line("// c\n# py") == ""
    assert code_sim_score("```python\nx = foo(a, b)\n```", "x = foo(a, b)") == 1.0
    # difflib: "abcd" vs "abce" match 3 of 8 characters in all: 2*3/8 = 0.75.
    assert edit_similarity("abcd", "abce") == 0.75
    # "hello" vs "help": "hel" matches, 2*3/9 = 66.7% rounds to a whole 67%.
    assert edit_similarity("hello", "help") == 0.67
    assert code_sim_score("# nothing but a comment", "return 1") == 0.0
    assert edit_similarity("", "") == 1.0  # fuzzywuzzy checks equality before emptiness


def test_score_sample_takes_the_best_answer_and_first_lines_of_few_shot_tasks():
    assert score_sample("hotpotqa", "Eiffel Tower", ["Paris", "Eiffel Tower"], None) == 1.0
    # triviaqa is scored on the first line only: "Rome" against "Rome".
    assert score_sample("triviaqa", "\nRome\nQuestion: What is the capital of Spain?", ["Rome"], None) == 1.0
    # hotpotqa is not cut: 1 common token of 4 predicted: P 1/4, R 1, F1 = 2*(1/4)/(5/4) = 0.4.
    assert score_sample("hotpotqa", "Rome\nQuestion: capital Spain?", ["Rome"], None) == pytest.approx(0.4)
    assert score_sample("trec", "Location\nEntity", ["Location"], TREC) == 1.0


def test_score_task_is_a_percentage_rounded_to_two_places():
    assert score_task([1.0, 0.5, 0.0]) == 50.0
    assert score_task([1.0, 0.0, 0.0]) == 33.33


def test_every_task_has_a_template_a_length_and_a_metric():
    assert set(PROMPTS) == set(MAX_NEW_TOKENS) == set(DATASET_METRIC)
    assert all("{context}" in template for template in PROMPTS.values())
