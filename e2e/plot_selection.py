"""Draws docs/selection.png from the issue-10 rows in docs/results/: NIAH found counts per selection setting,
and decode speed of exact against two-stage selection. Usage: python e2e/plot_selection.py"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def rows(*names: str) -> list[dict]:
    return [json.loads(line) for name in names for line in (RESULTS / name).read_text().splitlines()
            if line.startswith("{")]


def label(r: dict) -> str:
    if not r["select_oversample"]:
        return f"exact, r={r['select_every']}"
    return f"two-stage x{r['select_oversample']} c{r.get('select_chunk', 16)}, r={r['select_every']}"


def main() -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    found = collections.defaultdict(lambda: [0, 0])
    for r in rows("niah-select-h100.jsonl"):
        found[(label(r), "H100 8K")][0] += r["found"]
        found[(label(r), "H100 8K")][1] += 1
    for r in rows("niah-select-cpu.jsonl", "niah-select-cpu-2.jsonl"):
        key = (label(r), f"CPU {r['length'] // 1000}K")
        found[key][0] += r["found"]
        found[key][1] += 1
    keys = sorted(found)
    bars = left.barh([f"{k[1]}: {k[0]}" for k in keys], [found[k][0] for k in keys])
    left.bar_label(bars, labels=[f"{found[k][0]}/{found[k][1]}" for k in keys], fontsize=8)
    left.set_xlabel("needles found (of 9), budget 256")
    left.set_xlim(0, 9)
    left.set_title("NIAH: exact against two-stage selection")
    for run, (name, title) in enumerate((("bench-select-h100-256-os4c16.jsonl", "x4 c16"),
                                         ("bench-select-h100-256-os8c8.jsonl", "x8 c8")), start=1):
        for oversample in (0, 4, 8):
            pts = sorted((r["context"], r["decode_tokens_per_s"]) for r in rows(name) if r["select_oversample"] == oversample)
            if pts:
                right.plot(*zip(*pts), marker="o", label=f"run {run}: {'exact' if not oversample else 'two-stage ' + title}")
    right.set_xlabel("context tokens")
    right.set_ylabel("tokens/s, batch 32, budget 256 (H100, bf16)")
    right.set_title("Decode speed: exact against two-stage")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS.parent / "selection.png", dpi=110)


if __name__ == "__main__":
    main()
