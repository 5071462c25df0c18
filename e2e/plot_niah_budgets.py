"""Draws docs/niah-budgets.png from the fifteenth session's NIAH rows (docs/results/): needles found per selection
setting at budgets 128 and 512, on the CPU (2K, 4K, 8K) and the H100 (8K). Usage: python e2e/plot_niah_budgets.py"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
FILES = {"CPU": ("niah-cpu-budgets-r-grid.jsonl", "niah-cpu-small-middle.jsonl", "niah-cpu-small-middle-8k.jsonl"),
         "H100": ("niah-select-h100-budgets-r-grid.jsonl",)}
# The default oversampling each run's code gave an unset flag (the CPU grid ran before small budgets got more).
DEFAULTS = {("CPU", 128): {1: 8, 2: 8, 4: 16, 8: 16}, ("H100", 128): {1: 26, 2: 26, 4: 51, 8: 51},
            ("CPU", 512): {1: 4, 2: 4, 4: 7, 8: 7}, ("H100", 512): {1: 4, 2: 4, 4: 7, 8: 7}}


def setting(machine: str, r: dict) -> str:
    os = r["select_oversample"]
    if os == "-":
        os = DEFAULTS.get((machine, r["budget"]), {}).get(r["select_every"], "default")
    os = int(os) if str(os).isdigit() else os
    if not r.get("two_stage"):
        return "exact" if os == 0 else f"exact (x{os}, r={r['select_every']} below threshold)"
    return "stage one alone" if os == 1 else f"two stages x{os}, r={r['select_every']}"


def main() -> None:
    found = collections.defaultdict(lambda: [0, 0])
    for machine, names in FILES.items():
        for name in names:
            for line in (RESULTS / name).read_text().splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    cell = found[(r["budget"], setting(machine, r), f"{machine} {r['length'] // 1000}K")]
                    cell[0] += r["found"]
                    cell[1] += 1
    cols = ["CPU 2K", "CPU 4K", "CPU 8K", "H100 8K"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, budget in zip(axes, (128, 512)):
        rows = sorted({k[1] for k in found if k[0] == budget})
        grid = [[found.get((budget, row, col), [None])[0] for col in cols] for row in rows]
        shown = np.ma.masked_invalid([[np.nan if v is None else v for v in line] for line in grid])
        cmap = plt.get_cmap("RdYlGn").copy()
        cmap.set_bad("0.9")  # not run
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=9, aspect="auto")
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                ax.text(j, i, "not run" if v is None else f"{v}/9", ha="center", va="center", fontsize=9,
                        color="0.5" if v is None else "black")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(f"budget {budget}: needles found (3 depths x 3 seeds)")
    fig.suptitle("NIAH, two stages forced (--select-min-ratio 1), fifteenth session's runs")
    fig.tight_layout()
    fig.savefig(RESULTS.parent / "niah-budgets.png", dpi=110)


if __name__ == "__main__":
    main()
