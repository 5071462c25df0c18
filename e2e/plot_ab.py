"""Draws an A/B of `slam bench decode` rows labelled by code tree ("tree" in each JSON row, as the device
scripts write them): step time per shape, context and batch, one bar per tree, slam's rows only.

    python e2e/plot_ab.py docs/results/ab-placement-h100-3.jsonl docs/placement-kernels.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rows = [json.loads(line) for line in Path(src).read_text().splitlines() if line.startswith("{")]
    rows = [r for r in rows if r["engine"] == "slam" and r["policy"] == "slam"]
    cells = sorted({(r["shape"], r["context"], r["batch"]) for r in rows})
    trees = list(dict.fromkeys(r["tree"] for r in rows))
    width = 0.8 / len(trees)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(cells), 4.5))
    for t, tree in enumerate(trees):
        labelled = False
        for c, cell in enumerate(cells):
            steps = [r["step_ms"] for r in rows if r["tree"] == tree and (r["shape"], r["context"], r["batch"]) == cell]
            if steps:  # a tree run twice on a cell: its faster run
                bar = ax.bar(c + (t - (len(trees) - 1) / 2) * width, min(steps), width, color=f"C{t}",
                             label=None if labelled else tree)
                ax.bar_label(bar, fmt="%.1f", fontsize=8)
                labelled = True
    ax.set_xticks(range(len(cells)), [f"{s}\n{ctx // 1000}K, batch {b}" for s, ctx, b in cells], fontsize=8)
    ax.set_ylabel("decode step, ms (lower is better)")
    device = rows[0].get("device", "")
    ax.set_title(f"slam, budget {rows[0]['budget']}, r = {rows[0]['select_every']}, {rows[0]['reserve_dtype']} reserve "
                 f"({device})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
