"""PNG plots of evaluation results, for comparing policies at a glance."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only; never open a window.
import matplotlib.pyplot as plt

from slam.eval.niah import NiahCase
from slam.eval.ppl import PplResult


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


def method_name(policy: str, budget: int | None) -> str:
    return policy + (f"/{budget}" if budget else "")


def ruler_scores(cases: list, panels: list[str], methods: list[str], lengths: list[int]) -> dict:
    """{panel: {method: [mean score (0-100) per length]}}; the "average" panel averages the task means."""
    out: dict = {p: {m: [] for m in methods} for p in panels}
    for method in methods:
        for length in lengths:
            per_task = defaultdict(list)
            for c in cases:
                if method_name(c.policy, c.budget) == method and c.length == length:
                    per_task[c.task].append(c.score)
            means = {t: 100 * sum(s) / len(s) for t, s in per_task.items()}
            for panel in panels:
                value = means.get(panel) if panel != "average" else (sum(means.values()) / len(means) if means else None)
                out[panel][method].append(float("nan") if value is None else value)
    return out


def ruler_lines(cases: list, out: Path) -> None:
    """One panel per task plus their average: score by context length, one line per method (kvpress
    dashed); with a single length, one bar per method instead."""
    tasks = list(dict.fromkeys(c.task for c in cases))
    methods = list(dict.fromkeys(method_name(c.policy, c.budget) for c in cases))
    lengths = sorted({c.length for c in cases})
    panels = tasks + (["average"] if len(tasks) > 1 else [])
    scores = ruler_scores(cases, panels, methods, lengths)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.5, 3.4), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        if len(lengths) == 1:
            ax.bar(range(len(methods)), [scores[panel][m][0] for m in methods], color=[f"C{i}" for i in range(len(methods))])
            ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
        else:
            for method in methods:
                style = "--" if method.startswith("kvpress:") else "-"
                ax.plot(lengths, scores[panel][method], style, marker="o", label=method)
            ax.set_xlabel("context tokens")
            ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.set_title(panel)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("string-match score")
    settings = " / ".join(sorted({c.setting for c in cases}))
    at = f" at {lengths[0]} tokens" if len(lengths) == 1 else ""
    fig.suptitle(f"RULER-style tasks, question {settings}{at}", y=1.04)
    if len(lengths) > 1:
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def longbench_bars(summary: dict, out: Path) -> None:
    """Grouped bars: one group per task (and the average), one bar per method."""
    methods = list(summary)
    tasks = list(dict.fromkeys(t for m in summary.values() for t in m["tasks"])) + ["average"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(tasks) * max(len(methods), 2) / 2 + 2), 4))
    for i, method in enumerate(methods):
        scores = summary[method]["tasks"] | {"average": summary[method]["average"]}
        xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [scores.get(task, 0.0) for task in tasks], width, label=method)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_ylabel("score (official metric, 0-100)")
    ax.set_title("LongBench")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
