"""The routing-load picture: how one FlyLoRA adapter spreads tokens over its r experts."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..merge.plots import save_figure


def plot_routing_loads(stats: dict[str, dict], path: str | os.PathLike, title: str = "FlyLoRA expert load") -> Path:
    """Left: heat-map of each module's load fraction per expert ÷ the uniform share 1/r (1 = even),
    modules in model order; right: each module's routing entropy ÷ log r. `stats` are
    flylora.routing_stats entries (one adapter)."""
    if not stats:
        raise ValueError("no routing statistics to plot (no FlyLoRA tokens were routed)")
    loads = torch.tensor([s["load"] for s in stats.values()], dtype=torch.float64)  # (modules, r)
    r = loads.shape[1]
    ent = [s["entropy"] / s["max_entropy"] for s in stats.values()]
    fig = Figure(figsize=(9, 4.5))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    im = ax.imshow((loads * r).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(loads.max() * r)),
                   interpolation="nearest")
    ax.set_xlabel(f"expert (r = {r})")
    ax.set_ylabel(f"adapted module ({len(stats)}, model order)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="load ÷ uniform share 1/r")
    ax.set_title(title, fontsize=9)
    ax2.plot(ent, range(len(ent)), lw=0.8)
    ax2.set_xlim(min(0.8, min(ent) - 0.02), 1.0)
    ax2.set_xlabel("entropy / log r")
    ax2.grid(alpha=0.3)
    return save_figure(fig, path)
