"""The lr-sweep picture: validation score against learning rate per method (top row, one panel
per task and their mean; the chosen lr ringed), and the test-carve scores each method gets at
its own lr against the shared one, single-task and after merging (bottom).

Input is a `flylora sweep` results.json; scores are points (100 × accuracy)."""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from ..merge.plots import save_figure


def _mean_over_tasks(by_task: dict | None, tasks: list[str]) -> float | None:
    """Mean over tasks of the per-task seed mean; None if a task has no score."""
    if not by_task:
        return None
    means = []
    for t in tasks:
        vals = [v for v in (by_task.get(t) or {}).values() if v is not None]
        if not vals:
            return None
        means.append(statistics.fmean(vals))
    return statistics.fmean(means)


def plot_lr_sweep(res: dict, path: str | os.PathLike) -> Path:
    tasks, methods, lrs = res["tasks"], res["methods"], res["lrs"]
    panels = tasks + (["mean"] if len(tasks) > 1 else [])
    fig = Figure(figsize=(3.2 * len(panels), 6.4))
    top = fig.subplots(2, len(panels), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, panel in zip(top[0], panels):
        for m in methods:
            rows = res["select"]["scores"][m]
            ys = [rows[f"{lr:g}"]["mean" if panel == "mean" else "tasks"] for lr in lrs]
            ys = [y if panel == "mean" else (y or {}).get(panel) for y in ys]
            ax.plot(lrs, ys, marker="o", ms=4, lw=1.2, color=colours[m], label=m)
            best = res["best_lr"][m]
            y_best = ys[lrs.index(best)]
            if y_best is not None:
                ax.plot([best], [y_best], marker="o", ms=10, mfc="none", mec=colours[m], mew=1.5)
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], fontsize=7)
        ax.minorticks_off()
        ax.set_title(f"validation: {panel}", fontsize=9)
        ax.set_xlabel("learning rate", fontsize=8)
        ax.grid(alpha=0.3)
    top[0][0].set_ylabel("carved-val score (ringed: chosen)", fontsize=8)
    top[0][0].legend(fontsize=7)
    if len(panels) > 1:  # one wide bottom panel in place of the row's small ones
        for ax in top[1]:
            ax.remove()
        bottom = fig.add_subplot(2, 1, 2)
    else:
        bottom = top[1][0]
    _test_bars(bottom, res, colours)
    fig.suptitle(f"lr sweep: {res['name']} ({res['model']})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _test_bars(ax, res: dict, colours: dict) -> None:
    """Grouped bars: per method, mean over tasks on carved-test at its own lr and at the shared lr,
    single-task and for each merge."""
    tasks, methods, fin, ref = res["tasks"], res["methods"], res["final"], res.get("reference")
    merges = sorted({k for m in methods for k in fin["merged"].get(m, {})})
    groups = ["single"] + merges
    width = 0.8 / (len(methods) * (2 if ref else 1))
    heights = []
    for gi, group in enumerate(groups):
        slot = 0
        for m in methods:
            for src, hatch, tag in [(fin, "", "own lr"), (ref, "//", f"lr {ref['lr']:g}" if ref else "")]:
                if src is None:
                    continue
                data = src["single"].get(m) if group == "single" else src["merged"].get(m, {}).get(group)
                y = _mean_over_tasks(data, tasks)
                x = gi - 0.4 + width * (slot + 0.5)
                slot += 1
                if y is None:
                    continue
                heights.append(y)
                label = f"{m} ({tag})" if gi == 0 else None
                ax.bar(x, y, width, color=colours[m], hatch=hatch, edgecolor="white" if not hatch else "black",
                       lw=0.3, label=label, alpha=1.0 if not hatch else 0.6)
                ax.text(x, y + 0.3, f"{y:.1f}", ha="center", va="bottom", fontsize=6)
    if fin.get("base"):
        base = statistics.fmean(fin["base"][t] for t in tasks)
        ax.axhline(base, color="grey", ls="--", lw=0.8, label="base model")
        heights.append(base)
    if heights:  # differences of a few points must be visible: start the axis below the lowest bar
        ax.set_ylim(max(0.0, min(heights) - 8), min(100.0, max(heights) + 4))
    ax.set_xticks(range(len(groups)), ["single task"] + [f"merged: {g}" for g in merges], fontsize=8)
    ax.set_ylabel(f"carved-test score, mean of {len(tasks)} task(s) and {len(fin['seeds'])} seed(s)", fontsize=8)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
