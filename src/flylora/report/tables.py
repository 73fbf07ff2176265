"""Markdown tables and plots from an experiment's results.json, in the layout of the FlyLoRA
paper's Tables 1 and 2.

Table 1 (single task): one row per adapter method, Trainable(%) (trainable adapter parameters /
base parameters), Param(%) (those activated per token / base parameters, the paper's column) and
one column per task, "mean ± std" over seeds.
Table 2 (after merging): one block per merge method; each cell "after ± std (Δ)" with
Δ = mean(after) − mean(before) in absolute points (the paper's captions say "Δ%", but its numbers
are point differences, e.g. 36.53 → 30.05 is −6.48).
Scores are 100 × each task's primary metric; std is the sample std (n − 1), shown with ≥ 2 seeds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..pipeline.summaries import mean_std, merge_drops


def _cell(values: list) -> str:
    m, s = mean_std(values)
    if m is None:
        return "–"
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def _header(tasks: list[str], first: list[str]) -> list[str]:
    cols = first + tasks
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def table1(results: dict) -> str:
    """Single-task scores (paper Table 1 layout): Trainable(%) (all trainable adapter parameters /
    base parameters) and the paper's Param(%) (those active per token: k/r of FlyLoRA's B)."""
    tasks = results["tasks"]
    lines = _header(tasks, ["Method", "Trainable(%)", "Param(%)"])
    if results.get("base"):
        lines.append("| base model (no adapter) | – | – | "
                     + " | ".join(_cell([results["base"].get(t)]) for t in tasks) + " |")
    for label in results["methods"]:
        p = results.get("params", {}).get(label, {})
        pct = [f"{p[k]:.2f}" if p.get(k) is not None else "–" for k in ("trainable_pct", "activated_pct")]
        cells = [_cell(list(results["single"][label][t].values())) for t in tasks]
        lines.append(f"| {label} | {pct[0]} | {pct[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table2(results: dict) -> str:
    """Merged-model scores with Δ after − before (paper Table 2 layout), one block per merge."""
    tasks = results["tasks"]
    drops = merge_drops(results)
    blocks = []
    for mlabel in results["merges"]:
        rows = [label for label in results["methods"] if mlabel in results["merged"].get(label, {})]
        if not rows:
            continue
        lines = [f"**{mlabel}**", ""] + _header(tasks, ["Method"])
        for label in rows:
            cells = []
            for t in tasks:
                after = list(results["merged"][label][mlabel][t].values())
                d = drops.get(mlabel, {}).get(label, {}).get(t)
                cells.append(_cell(after) + ("" if d is None else f" ({d:+.2f})"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def markdown(results: dict) -> str:
    ev = results.get("eval", {})
    seeds = results.get("seeds", [])
    metric = ", ".join(f"{t}: {m}" for t, m in results.get("metric", {}).items()) or "primary metric"
    head = [f"# {results.get('name', 'experiment')}: {results.get('model')}", ""]
    if results.get("description"):
        head += [results["description"], ""]
    head += [f"Scores: 100 × {metric}; split {ev.get('split')}, {ev.get('limit') or 'all'} examples per task, "
             f"mode {ev.get('mode')}; mean ± std over seeds {seeds}.", ""]
    parts = head + ["## Single task (Table 1 layout)", "", table1(results),
                    "## After merging (Table 2 layout; Δ = after − before, absolute points)", "", table2(results)]
    if results.get("skipped"):
        parts += ["Not applicable: " + "; ".join(f"{m} × {k}: {why}" for m, d in results["skipped"].items()
                                                  for k, why in d.items()), ""]
    if results.get("sources"):
        parts += ["Data: " + "; ".join(f"{t}: {s}" for t, s in results["sources"].items()), ""]
    if results.get("timing"):
        tm = results["timing"]
        parts += [f"Wall time: {tm.get('total_s')} s (train {tm.get('train_s')} s, evaluation {tm.get('eval_s')} s, "
                  f"merge + analysis {tm.get('merge_s')} s; cached stages count 0).", ""]
    return "\n".join(parts)


def write_report(results: dict | str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, str]:
    """report.md, merge_drops.png (every merge × method) and merge_drops_<merge>.png per merge
    method, plus interference.md when the experiment ran the analysis. Returns the paths."""
    from ..merge.plots import plot_merge_drops

    if not isinstance(results, dict):
        results = load_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": str(out / "report.md")}
    md = markdown(results)
    drops = merge_drops(results)
    if drops:
        combined = {f"{label} / {mlabel}": d for mlabel, by in drops.items() for label, d in by.items()}
        paths["merge_drops"] = str(plot_merge_drops(combined, out / "merge_drops.png",
                                                    title="score after merging − single-task score (points)"))
        for mlabel, by in drops.items():
            plot_merge_drops(by, out / f"merge_drops_{mlabel}.png", title=f"{mlabel}: after − before (points)")
        md += f"\n![merge drops]({Path(paths['merge_drops']).name})\n"
    analyses = [(label, mlabel, p) for label, d in results.get("analysis", {}).items() for mlabel, p in d.items()]
    if analyses:
        from ..merge.analysis import interference_markdown

        parts = []
        for label, mlabel, p in analyses:
            if Path(p).is_file():
                parts.append(f"### {label} / {mlabel}\n\n" + interference_markdown(json.loads(Path(p).read_text())))
        if parts:
            (out / "interference.md").write_text("# Interference analysis\n\n" + "\n".join(parts))
            paths["interference"] = str(out / "interference.md")
            md += "\n" + "\n".join(parts)
    Path(paths["markdown"]).write_text(md)
    return paths


def load_results(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no results.json (run an experiment first)")
    data = json.loads(p.read_text())
    if "flylora_results_version" not in data:
        raise ValueError(f"{p}: not an experiment results.json (no flylora_results_version)")
    return data
