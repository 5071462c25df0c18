"""LongBench's scoring, written to give the same numbers as the official metrics.py and eval.py.

Each metric takes one prediction and one reference answer; `score_sample` takes the best over a sample's
answers, and `score_task` averages samples as a percentage rounded to two decimals, as eval.py does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from difflib import SequenceMatcher

from rouge import Rouge

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, then the articles a/an/the, then collapse white space (SQuAD's order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: list[str], reference: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def rouge_score(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F from the `rouge` package; the official code scores 0 whenever that package raises
    (an empty or punctuation-only prediction)."""
    try:
        return Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:  # noqa: BLE001 - the official scorer treats every failure as a zero
        return 0.0


def classification_score(prediction: str, reference: str, all_classes: list[str], **_) -> float:
    """1/k when the reference is among the k class names found in the prediction.

    A class found only as part of the reference's longer name does not count against it. The official
    loop removes such classes from the list it iterates over, so the class right after a removed one is
    never examined; that quirk is kept so that scores match."""
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):
        name = matches[i]
        if name in reference and name != reference:
            matches.remove(name)
        i += 1
    return 1.0 / len(matches) if reference in matches else 0.0


def _share_equal(numbers: list[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, reference: str, **_) -> float:
    """The share of the numbers in the prediction that equal the reference count."""
    return _share_equal(re.findall(r"\d+", prediction), str(reference))


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """The share of the numbers in the prediction that equal the reference's "Paragraph N"."""
    target = re.findall(r"Paragraph (\d+)", reference)[0]
    return _share_equal(re.findall(r"\d+", prediction), target)


def first_code_line(prediction: str) -> str:
    """The first line that is not a comment or a code fence (lines with `, # or // are skipped)."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def edit_similarity(a: str, b: str) -> float:
    """fuzzywuzzy's `fuzz.ratio` / 100 as the official environment runs it: without python-Levenshtein
    it is difflib's ratio rounded to a whole percent; equal strings score 1 and an empty one 0."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    return round(100 * SequenceMatcher(None, a, b).ratio()) / 100


def code_sim_score(prediction: str, reference: str, **_) -> float:
    return edit_similarity(first_code_line(prediction), reference)


Metric = Callable[..., float]

DATASET_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# Few-shot tasks whose predictions are cut to their first line before scoring.
FIRST_LINE_TASKS = {"trec", "triviaqa", "samsum", "lsht"}


def score_sample(dataset: str, prediction: str, answers: list[str], all_classes: list[str] | None) -> float:
    if dataset in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET_METRIC[dataset]
    return max((metric(prediction, answer, all_classes=all_classes) for answer in answers), default=0.0)


def score_task(scores: list[float]) -> float:
    return round(100 * sum(scores) / len(scores), 2) if scores else 0.0
