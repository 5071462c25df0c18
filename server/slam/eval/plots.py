"""PNG plots of evaluation results, for comparing policies at a glance."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only; never open a window.
import matplotlib.pyplot as plt  # noqa: E402

from slam.eval.niah import NiahCase  # noqa: E402
from slam.eval.ppl import PplResult  # noqa: E402


def niah_heatmap(cases: list[NiahCase], out: Path) -> None:
    """One panel per (policy, budget): fraction of seeds that found the needle, by length and depth."""
    groups: dict[tuple, list[NiahCase]] = defaultdict(list)
    for case in cases:
        groups[(case.policy, case.budget)].append(case)
    lengths = sorted({c.length for c in cases})
    depths = sorted({c.depth for c in cases})
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 1, 3.2), squeeze=False)
    for ax, ((policy, budget), group) in zip(axes[0], sorted(groups.items(), key=lambda kv: str(kv[0]))):
        grid = [[0.0] * len(lengths) for _ in depths]
        for di, depth in enumerate(depths):
            for li, length in enumerate(lengths):
                hits = [c.found for c in group if c.depth == depth and c.length == length]
                grid[di][li] = sum(hits) / len(hits) if hits else float("nan")
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(f"{policy}" + (f" / {budget}" if budget else ""))
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("needle depth")
        for di in range(len(depths)):
            for li in range(len(lengths)):
                ax.text(li, di, f"{grid[di][li]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="found")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def ppl_curves(results: list[PplResult], out: Path, window: int = 128) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        xs, ys = zip(*result.curve(window)) if result.curve(window) else ((), ())
        label = result.policy + (f" (budget {result.budget})" if result.budget else "")
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"perplexity over {window}-token windows")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
