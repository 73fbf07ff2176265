"""A fair learning rate per method: sweep lr on a validation carve, report on the test carve.

    flylora sweep recipes/cpu/lr_sweep_smollm2.yaml [key=value ...]

Two experiments (flylora.pipeline.experiment) that share one folder of training runs:

  1. select  every method × every lr in `lrs`, trained on carved-fit with `select.seeds`, each
             adapter scored on its own task's carved-val (`select.limit` questions). A method's
             best lr maximises its mean single-task validation score over tasks and seeds
             (ties: the first in `lrs`). carved-val is a seeded stratified carve of carved-train,
             disjoint from carved-test (tasks/base.py), so the test carve plays no part in the choice.
  2. final   every method at its own best lr with `final.seeds`, trained on the same carved-fit
             (the selection's seed runs are reused, not retrained), scored single-task and merged
             (`final.merges`) on carved-test, mean ± std over seeds. With `final.reference_lr`,
             every method also at that one shared lr (same data and seeds): the untuned yardstick.

The sweep spec (validated strictly; one line naming a bad key):

    name: lr_sweep
    experiment: experiment_smollm2.yaml   # the experiment spec swept (path relative to this file, or a mapping)
    overrides: {}                         # dotted keys applied to that spec, e.g. {tasks: [cloze:sst2]}
    lrs: [3.0e-4, 1.0e-3, 3.0e-3]
    select: {seeds: [0], limit: 50}
    final: {seeds: [0, 1, 2], limit: 100, merges: [weight_average], reference_lr: 1.0e-3}
    compare: ../../docs/demo/seeds3/results.json   # optional: an earlier results.json at one lr, shown alongside
    output_dir: runs/sweeps/{name}

Every stage is cached (the experiment machinery's run.json / results.json / merge.json), so a
rerun after a kill picks up where it stopped. Output: <out>/results.json, <out>/report.md and <out>/lr_sweep.png,
plus the two experiments' own folders (<out>/select, <out>/final with its Table 1/2 report).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .experiment import _json, _write_json, run_experiment
from .experiment_spec import read_spec_source
from .recipe import _build, apply_overrides, read_yaml
from .summaries import mean_std

SWEEP_VERSION = 1
FIT_SPLITS = ("carved-train", "carved-fit")  # recipes the sweep can carve a validation set from


@dataclass
class SelectSpec:
    seeds: list[int] = field(default_factory=lambda: [0])
    limit: Optional[int] = 50  # carved-val questions per task


@dataclass
class FinalSpec:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    limit: Optional[int] = 100  # carved-test questions per task
    merges: Optional[list[str]] = None  # merge labels of the experiment to run (default: all)
    reference_lr: Optional[float] = None  # also every method at this one lr (e.g. the demo's), same seeds/data


@dataclass
class SweepSpec:
    name: str = "lr_sweep"
    description: str = ""
    experiment: Any = None  # experiment spec: path or mapping
    overrides: dict = field(default_factory=dict)  # applied to it (dotted keys: tasks, eval.batch_size, ...)
    lrs: list[float] = field(default_factory=list)
    select: SelectSpec = field(default_factory=SelectSpec)
    final: FinalSpec = field(default_factory=FinalSpec)
    compare: Optional[str] = None  # an earlier experiment results.json (e.g. the demo at one lr)
    output_dir: str = "runs/sweeps/{name}"

    @property
    def out(self) -> Path:
        return Path(self.output_dir.replace("{name}", self.name))


def lr_label(label: str, lr: float) -> str:
    """lora_r8_lr3e-3, fly_lr2p5e-4: no "." (the label is a PEFT adapter name, a module key)."""
    mant, exp = f"{lr:e}".split("e")
    mant = mant.rstrip("0").rstrip(".").replace(".", "p")
    return f"{label}_lr{mant}e{int(exp)}"


def load_sweep(source: str | Path | dict, overrides: list[str] | dict | None = None) -> tuple[SweepSpec, dict, Path]:
    """(validated sweep spec, experiment spec dict with its recipe inlined, folder relative paths resolve from)."""
    data, base_dir = read_spec_source(source, overrides)
    spec = _build(SweepSpec, data, "sweep")
    if len(spec.lrs) < 2 or len(set(spec.lrs)) != len(spec.lrs) or any(lr <= 0 for lr in spec.lrs):
        raise ValueError(f"sweep.lrs: needs at least 2 distinct positive learning rates, got {spec.lrs!r}")
    for section in ("select", "final"):
        s = getattr(spec, section)
        if not s.seeds:
            raise ValueError(f"sweep.{section}.seeds: needs at least one seed")
        if s.limit is not None and s.limit < 1:
            raise ValueError(f"sweep.{section}.limit: must be >= 1, got {s.limit!r}")
    if isinstance(spec.experiment, str):
        path = Path(spec.experiment)
        path = path if path.is_absolute() or path.is_file() else base_dir / path
        exp = read_yaml(path)
        exp_dir = path.parent
    elif isinstance(spec.experiment, dict):
        exp, exp_dir = dict(spec.experiment), base_dir
    else:
        raise ValueError(f"sweep.experiment: expected an experiment spec path or mapping, got {spec.experiment!r}")
    if isinstance(exp.get("recipe"), str):  # inline it, so the split can be overridden
        rpath = Path(exp["recipe"])
        exp["recipe"] = read_yaml(rpath if rpath.is_absolute() or rpath.is_file() else exp_dir / rpath)
    if not isinstance(exp.get("recipe"), dict):
        raise ValueError("sweep.experiment.recipe: expected a recipe path or mapping")
    try:
        exp = apply_overrides(exp, spec.overrides)
    except ValueError as e:
        raise ValueError(f"sweep.overrides: {e}") from None
    split = exp["recipe"].get("data", {}).get("split", "train")
    if split not in FIT_SPLITS:
        raise ValueError(f"sweep.experiment.recipe.data.split: {split!r} is not allowed (allowed: "
                         f"{', '.join(FIT_SPLITS)}; the validation carve is cut from carved-train)")
    merges = exp.get("merges") or {}
    unknown = sorted(set(spec.final.merges or []) - set(merges))
    if unknown:
        raise ValueError(f"sweep.final.merges: {unknown} are not among the experiment's merges {sorted(merges)}")
    for mlabel, merge in merges.items():  # checked now, not after the selection stage has run
        only = (merge or {}).get("only") if isinstance(merge, dict) else None
        if only is not None and not set(only) <= set(exp.get("methods") or {}):
            raise ValueError(f"sweep.experiment.merges.{mlabel}.only: unknown method labels "
                             f"{sorted(set(only) - set(exp.get('methods') or {}))}")
    if spec.final.reference_lr is not None and spec.final.reference_lr <= 0:
        raise ValueError(f"sweep.final.reference_lr: must be > 0, got {spec.final.reference_lr!r}")
    if spec.compare and not Path(spec.compare).is_absolute() and not Path(spec.compare).is_file():
        spec.compare = str(base_dir / spec.compare)
    if spec.compare and not Path(spec.compare).is_file():
        raise FileNotFoundError(f"sweep.compare: {spec.compare!r} not found")
    return spec, exp, base_dir


def _stage_spec(spec: SweepSpec, exp: dict, stage: str, methods: dict, seeds: list[int], split: str,
                limit: int | None, merges: dict, include_base: bool) -> dict:
    """The experiment spec of one stage: trained on carved-fit, runs in the shared <out>/train."""
    ev = dict(exp.get("eval") or {}, split=split, limit=limit, include_base=include_base)
    return apply_overrides(exp, {"name": f"{spec.name}-{stage}", "recipe.data.split": "carved-fit"}) | {
        "methods": methods, "seeds": seeds, "eval": ev, "merges": merges, "analysis": False,
        "output_dir": str(spec.out / stage), "train_dir": str(spec.out / "train")}


def _relabel_only(merge: dict, lrs_of: dict[str, set[float]]) -> dict:
    """The merge spec with `only: [method, ...]` rewritten to the stage's `method_lr…` labels."""
    only = (merge or {}).get("only")
    if only is None:
        return merge
    unknown = sorted(set(only) - set(lrs_of))
    if unknown:
        raise ValueError(f"sweep.experiment.merges.only: unknown method labels {unknown} (methods: {sorted(lrs_of)})")
    return dict(merge, only=sorted(lr_label(m, lr) for m in only for lr in lrs_of[m]))


def select_lr(scores: dict[float, float | None], lrs: list[float]) -> float:
    """argmax of the validation score over `lrs` (in their order, so ties go to the first)."""
    best = None
    for lr in lrs:
        s = scores.get(lr)
        if s is not None and (best is None or s > scores[best]):
            best = lr
    if best is None:
        raise ValueError("no validation score to select a learning rate from")
    return best


def run_sweep(source: str | Path | dict, overrides: list[str] | dict | None = None, *, progress: bool = True) -> dict:
    spec, exp, _ = load_sweep(source, overrides)
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    methods = exp.get("methods") or {}
    if not methods:
        raise ValueError("sweep.experiment.methods: needs at least one method")

    # 1. selection on carved-val: method × lr, no merges
    grid = {lr_label(m, lr): dict(o, **{"train.lr": lr}) for m, o in methods.items() for lr in spec.lrs}
    t0 = time.monotonic()
    sel = run_experiment(_stage_spec(spec, exp, "select", grid, spec.select.seeds, "carved-val",
                                     spec.select.limit, {}, False), progress=progress)
    select_s = time.monotonic() - t0
    validation: dict = {}
    best: dict = {}
    for m in methods:
        validation[m] = {}
        for lr in spec.lrs:
            per_task = {t: mean_std(list(sel["single"][lr_label(m, lr)][t].values()))[0] for t in sel["tasks"]}
            vals = [v for v in per_task.values() if v is not None]
            validation[m][lr] = {"tasks": per_task, "mean": sum(vals) / len(vals) if vals else None}
        best[m] = select_lr({lr: v["mean"] for lr, v in validation[m].items()}, spec.lrs)

    # 2. each method at its own best lr on carved-test, more seeds, merged
    exp_merges = exp.get("merges") or {}
    merges = {k: v for k, v in exp_merges.items() if spec.final.merges is None or k in spec.final.merges}
    chosen = {lr_label(m, best[m]): grid[lr_label(m, best[m])] for m in methods}
    ref_lr = spec.final.reference_lr
    if ref_lr is not None:  # after the chosen ones, so an interrupted sweep has those first
        chosen |= {lr_label(m, ref_lr): dict(o, **{"train.lr": ref_lr}) for m, o in methods.items()}
    # a merge's `only:` names the experiment's method labels; the stage's labels carry the lr
    lrs_of = {m: {best[m]} | ({ref_lr} if ref_lr is not None else set()) for m in methods}
    merges = {k: _relabel_only(v, lrs_of) for k, v in merges.items()}
    t0 = time.monotonic()
    fin = run_experiment(_stage_spec(spec, exp, "final", chosen, spec.final.seeds, "carved-test",
                                     spec.final.limit, merges, bool((exp.get("eval") or {}).get("include_base", True))),
                         progress=progress)
    final_s = time.monotonic() - t0

    results = {
        "flylora_sweep_version": SWEEP_VERSION, "name": spec.name, "description": spec.description,
        "model": fin["model"], "tasks": fin["tasks"], "methods": list(methods), "lrs": spec.lrs,
        "select": {"split": "carved-val", "limit": spec.select.limit, "seeds": spec.select.seeds,
                   "criterion": "mean over tasks of the single-task validation score (points)",
                   "scores": {m: {f"{lr:g}": v for lr, v in d.items()} for m, d in validation.items()}},
        "best_lr": best,
        "final": {"split": fin["eval"]["split"], "limit": spec.final.limit, "seeds": spec.final.seeds,
                  "labels": {m: lr_label(m, best[m]) for m in methods}, "base": fin["base"],
                  "single": {m: fin["single"][lr_label(m, best[m])] for m in methods},
                  "merged": {m: fin["merged"][lr_label(m, best[m])] for m in methods},
                  "params": {m: fin["params"].get(lr_label(m, best[m])) for m in methods},
                  "sources": fin["sources"]},
        "reference": None if ref_lr is None else {
            "lr": ref_lr, "labels": {m: lr_label(m, ref_lr) for m in methods},
            "single": {m: fin["single"][lr_label(m, ref_lr)] for m in methods},
            "merged": {m: fin["merged"][lr_label(m, ref_lr)] for m in methods}},
        "compare": _comparison(spec.compare),
        "timing": _timing(out, {"select_s": round(select_s, 1), "final_s": round(final_s, 1),
                                "total_s": round(time.monotonic() - started, 1),
                                "select_detail": sel["timing"], "final_detail": fin["timing"]}),
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        "spec": {"experiment": exp, "lrs": spec.lrs, "select": vars(spec.select), "final": vars(spec.final)},
    }
    _write_json(out / "results.json", results)
    from ..report.tables import write_report

    write_report(fin, out / "final")
    from ..fsutil import atomic_write_text
    from ..report.sweep_plot import plot_lr_sweep
    from .sweep_report import markdown

    atomic_write_text(out / "report.md", markdown(results))
    plot_lr_sweep(results, out / "lr_sweep.png")
    return results


def _comparison(path: str | None) -> dict | None:
    """single/merged of an earlier experiment (one lr for all methods), for the report."""
    if not path:
        return None
    old = _json(Path(path))
    if old is None:
        raise FileNotFoundError(f"sweep.compare: {path!r} not found")
    lrs = {label: (old.get("spec", {}).get("methods", {}).get(label, {}).get("train.lr")
                   or old.get("spec", {}).get("recipe", {}).get("train", {}).get("lr")) for label in old["methods"]}
    return {"path": str(path), "name": old.get("name"), "seeds": old.get("seeds"), "lr": lrs,
            "train_split": old.get("spec", {}).get("recipe", {}).get("data", {}).get("split"),
            "single": old["single"], "merged": old["merged"], "eval": old.get("eval")}


def _timing(out: Path, now: dict) -> dict:
    """This invocation's wall times plus every earlier one (a resumed sweep sums its invocations;
    cached stages cost ~0), kept in <out>/timing_log.json."""
    log_path = out / "timing_log.json"
    log = (_json(log_path) or {"invocations": []})["invocations"] + [now]
    _write_json(log_path, {"invocations": log})
    return {"invocations": log, "wall_s_all_invocations": round(sum(i["total_s"] for i in log), 1)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="sweep spec YAML, e.g. recipes/cpu/lr_sweep_smollm2.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides, e.g. 'final.seeds=[0,1,2]'")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """`flylora sweep`: errors propagate to the dispatcher, which prints them in one line."""
    results = run_sweep(args.spec, args.overrides, progress=not args.no_progress)
    from .sweep_report import markdown

    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flylora.pipeline.sweep", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
