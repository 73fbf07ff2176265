"""PNG plots for merge analysis. Uses matplotlib's Agg canvas directly (no pyplot), so importing
this never changes the process-wide backend and works headless."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(path)!r}")
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    from ..fsutil import atomic_write_bytes  # a kill mid-save never leaves a truncated PNG

    return atomic_write_bytes(path, buf.getvalue())


def plot_cosine_heatmap(
    matrix: Tensor | Sequence[Sequence[float | None]],
    task_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "cos(vec ΔW_i, vec ΔW_j), mean over modules",
) -> Path:
    """Heat-map of a (T, T) cosine matrix (e.g. `mean_cosine_matrix` or a summary's `mean_matrix`),
    each cell annotated; colour scale fixed to [-1, 1] so plots from different runs compare."""
    rows = matrix.tolist() if isinstance(matrix, Tensor) else [list(row) for row in matrix]
    # None is how JSON summaries spell NaN (a zero ΔW); draw it as a blank cell
    m = torch.tensor([[float("nan") if x is None else float(x) for x in row] for row in rows], dtype=torch.float64)
    T = len(task_names)
    if m.shape != (T, T):
        raise ValueError(f"matrix shape {tuple(m.shape)} does not match {T} task names")
    fig = Figure(figsize=(1.2 + 0.9 * T, 1.0 + 0.8 * T))
    ax = fig.add_subplot()
    im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(T), task_names, rotation=45, ha="right")
    ax.set_yticks(range(T), task_names)
    for i in range(T):
        for j in range(T):
            v = float(m[i, j])
            ax.text(j, i, "–" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(v) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_merge_drops(
    drops: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    title: str = "score after merge − before (points)",
    ylabel: str = "Δ (points)",
) -> Path:
    """Grouped bars: x = task, one bar per merge method; drops = {method: {task: after − before}}.
    Tasks missing for a method are left blank."""
    if not drops:
        raise ValueError("drops is empty: need {method: {task: value}}")
    methods = list(drops)
    tasks = list(dict.fromkeys(t for d in drops.values() for t in d))
    if not tasks:
        raise ValueError("drops has no tasks")
    width = 0.8 / len(methods)
    fig = Figure(figsize=(1.5 + 1.1 * len(tasks) * max(1, len(methods) / 3), 3.6))
    ax = fig.add_subplot()
    for k, method in enumerate(methods):
        xs = [i - 0.4 + width * (k + 0.5) for i, t in enumerate(tasks) if t in drops[method]]
        ys = [float(drops[method][t]) for t in tasks if t in drops[method]]
        ax.bar(xs, ys, width=width, label=method)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    return save_figure(fig, path)
