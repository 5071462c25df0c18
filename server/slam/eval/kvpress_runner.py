"""`slam-kvpress`: run prompts through kvpress presses, JSON on stdin, JSON on stdout.

kvpress pins an older transformers than SLAM, so this file runs in its own environment: it imports nothing
from slam, and `slam eval ... --compare kvpress --kvpress-python PATH` runs it as `PATH kvpress_runner.py`.

Input: {"model": dir, "device": "cpu", "dtype": "float32", "presses": [names], "budgets": [tokens],
        "question_unseen": bool, "samples": [{"id", "context", "question", "answer_prefix", "max_new_tokens"}]}
Output: {"versions": {...}, "results": [{"id", "press", "budget", "compression_ratio", "context_tokens",
         "answer"} or {..., "error"}]}

A press keeps `1 - compression_ratio` of the context's tokens, so a budget of B tokens over a context of
N tokens is the ratio 1 - B / N (0 when the context fits). Question unseen: the context is compressed alone
and the question follows (`question=`); question known: the question ends the context and is compressed
with it, as in kvpress's own evaluation.
"""

from __future__ import annotations

import json
import sys


def make_press(name: str, ratio: float):
    import kvpress

    scorers = {
        "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "observed_attention": lambda: kvpress.ObservedAttentionPress(compression_ratio=ratio),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
    }
    if name.startswith("adakv_") and name[len("adakv_"):] in scorers:
        return kvpress.AdaKVPress(scorers[name[len("adakv_"):]]())
    if name not in scorers:
        raise ValueError(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")
    return scorers[name]()


PRESSES = ["streaming_llm", "snapkv", "observed_attention", "expected_attention", "tova", "knorm",
           "adakv_snapkv", "adakv_expected_attention"]
EAGER_PRESSES = {"observed_attention"}  # needs the attention weights, which only eager attention returns


def versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("kvpress", "transformers", "torch")} | {
        "python": sys.version.split()[0]
    }


def load_pipeline(model: str, device: str, dtype: str, eager: bool):
    import kvpress  # noqa: F401 - registers the "kv-press-text-generation" pipeline
    import torch
    from transformers import pipeline

    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": "eager" if eager else "sdpa"}
    return pipeline("kv-press-text-generation", model=model, device=device, model_kwargs=kwargs)


def context_tokens(pipe, sample: dict, question_unseen: bool) -> tuple[str, str, int]:
    """The context and question the pipeline gets, and the context's length in tokens after its template."""
    context, question = sample["context"], sample["question"]
    if not question_unseen:
        context, question = context + question, ""
    inputs = pipe.preprocess(context, [question], sample.get("answer_prefix", ""), max_context_length=10**9)
    return context, question, int(inputs["context_ids"].shape[1])


def run(request: dict) -> dict:
    unseen = bool(request.get("question_unseen", False))
    results, pipes = [], {}
    for name in request["presses"]:
        eager = name in EAGER_PRESSES
        if eager not in pipes:
            pipes[eager] = load_pipeline(request["model"], request.get("device", "cpu"),
                                         request.get("dtype", "float32"), eager)
        pipe = pipes[eager]
        for sample in request["samples"]:
            context, question, n = context_tokens(pipe, sample, unseen)
            for budget in request["budgets"]:
                ratio = max(0.0, 1.0 - budget / n)
                row = {"id": sample["id"], "press": name, "budget": budget, "compression_ratio": ratio,
                       "context_tokens": n}
                try:
                    out = pipe(context, question=question or None, answer_prefix=sample.get("answer_prefix", ""),
                               press=make_press(name, ratio), max_new_tokens=sample.get("max_new_tokens", 32))
                    row["answer"] = out["answer"]
                except Exception as e:  # noqa: BLE001 - one failing press is reported, the others still run
                    row["error"] = f"{type(e).__name__}: {e}"
                results.append(row)
    return {"versions": versions(), "results": results}


def main() -> int:
    try:
        request = json.load(sys.stdin)
    except json.JSONDecodeError as e:
        print(f"slam-kvpress: error: stdin is not JSON: {e}", file=sys.stderr)
        return 2
    unknown = [p for p in request.get("presses", []) if p not in PRESSES]
    if unknown:
        print(f"slam-kvpress: error: unknown press {unknown[0]!r}; choose from {', '.join(PRESSES)}", file=sys.stderr)
        return 2
    json.dump(run(request), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
