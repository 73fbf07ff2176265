"""Summaries read from an experiment's results.json (flylora.pipeline.experiment writes it):
mean ± sample std over seeds, and each merge's drop from the single-task scores. Used by the
report tables, the demo's summary and the lr sweep's selection and report."""
from __future__ import annotations

import math


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def merge_drops(results: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{merge label: {method label: {task: mean(after) − mean(before)}}} in points."""
    out: dict = {}
    for label, merges in results["merged"].items():
        for mlabel, per_task in merges.items():
            for task, by_seed in per_task.items():
                after, _ = mean_std(list(by_seed.values()))
                before, _ = mean_std(list(results["single"][label][task].values()))
                if after is not None and before is not None:
                    out.setdefault(mlabel, {}).setdefault(label, {})[task] = after - before
    return out
