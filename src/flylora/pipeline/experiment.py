"""The multi-task merging experiment: train T adapters per method and seed, evaluate each on its
own task, merge them, evaluate the merge on every task; results.json for `flylora report`.

    from flylora.pipeline.experiment import run_experiment
    results = run_experiment("recipes/cpu/experiment_smollm2.yaml")  # or a dict: flylora.pipeline.demo.demo_spec()
    # -> <output_dir>/results.json; then flylora.report.write_report(results, out_dir)

CLI: `flylora report --experiment SPEC.yaml [key=value ...]` (runs, then writes the report), or
`python -m flylora.pipeline.experiment SPEC.yaml`. The spec's fields and their validation:
flylora.pipeline.experiment_spec; summaries of the results (mean ± std, merge drops):
flylora.pipeline.summaries.

Every stage is cached on disk (run.json, results.json, merge.json), so a rerun after an
interruption picks up where it stopped; a training run interrupted mid-way resumes from its last
checkpoint. Models trained on carved-train are evaluated on carved-test (same carve seed).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

from .experiment_spec import DELTA_OK, ExperimentSpec, MergeSpec, _spec_dict, load_spec, merge_applies, recipe_for, slug
from .recipe import load_recipe

RESULTS_VERSION = 1


# ----------------------------------------------------------------------------------- stages
def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    from ..fsutil import atomic_write_json  # temp, fsync, rename

    atomic_write_json(path, data)


def _eval_kwargs(spec: ExperimentSpec, data: dict) -> dict:
    e = spec.eval
    split = e.split or ("carved-test" if data.get("split") in ("carved-train", "carved-fit") else "test")
    kw = dict(split=split, limit=e.limit, limit_seed=e.limit_seed, mode=e.mode, batch_size=e.batch_size,
              bf16_autocast=e.bf16_autocast, carve_seed=data.get("carve_seed", 0),
              carve_fraction=data.get("carve_fraction", 0.5), progress=False)
    if data.get("template"):  # evaluate on the prompt the adapters were trained on
        kw["template"] = data["template"]
    if data.get("chat_template"):
        kw["chat"] = True
    if e.max_new_tokens:
        kw["max_new_tokens"] = e.max_new_tokens
    return kw


def _scores(report: dict) -> dict[str, float | None]:
    """{task: score in points (100 × primary metric)}."""
    return {r["task"]: None if r["score"] is None else 100.0 * r["score"] for r in report["results"]}


def _evaluate(tasks: list[str], model_name: str, out_dir: Path, kwargs: dict, *, adapter: tuple | None = None,
              union: str | None = None, full: str | None = None, per_task: dict | None = None) -> dict:
    """Cached evaluation: out_dir/results.json. Tasks with their own settings (`per_task`) are
    evaluated in their own call (out_dir/<task>/), then the reports are combined."""
    cached = _json(out_dir / "results.json")
    if cached is not None and cached.get("complete", True):  # an interrupted eval is redone, not reused
        return cached
    special = [t for t in tasks if (per_task or {}).get(t)]
    if not special:
        return _evaluate_once(tasks, model_name, out_dir, kwargs, adapter=adapter, union=union, full=full)
    groups = [(t, {**kwargs, **per_task[t]}, out_dir / slug(t)) for t in special]
    plain = [t for t in tasks if t not in special]
    if plain:
        groups.insert(0, (plain, kwargs, out_dir / "_plain"))
    reports = [_evaluate_once(ts if isinstance(ts, list) else [ts], model_name, d, kw, adapter=adapter,
                              union=union, full=full) for ts, kw, d in groups]
    combined = dict(reports[0], results=[r for rep in reports for r in rep["results"]])
    _write_json(out_dir / "results.json", combined)
    return combined


def _evaluate_once(tasks: list[str], model_name: str, out_dir: Path, kwargs: dict, *, adapter: tuple | None = None,
                   union: str | None = None, full: str | None = None) -> dict:
    from ..evaluation.evaluate import evaluate

    cached = _json(out_dir / "results.json")
    if cached is not None and cached.get("complete", True):  # an interrupted eval is redone, not reused
        return cached
    if union is not None:
        from ..merge.union import load_routed_union
        from ..models import load_model, load_tokenizer, resolve_model_path

        path = resolve_model_path(model_name)
        model = load_routed_union(load_model(path), union)
        return evaluate(tasks, model, tokenizer=load_tokenizer(path), out_dir=out_dir, **kwargs)
    if full is not None:
        return evaluate(tasks, full, out_dir=out_dir, **kwargs)
    return evaluate(tasks, model_name, [adapter] if adapter else [], out_dir=out_dir, **kwargs)


def run_experiment(spec_source: str | os.PathLike | dict, overrides: list[str] | dict | None = None,
                   *, progress: bool = True) -> dict:
    """Run (or finish) the experiment; returns the results dict, also written to <out>/results.json.
    Results are keyed by evaluation task (spec.eval.task_map maps training tasks to them).
    The folder must be new, empty or an experiment folder of ours; it is locked while running."""
    from ..fsutil import dir_lock, ensure_dir

    spec, base_recipe = load_spec(spec_source, overrides)
    out = ensure_dir(spec.out, "spec.output_dir", kind="experiment")
    with dir_lock(out, "experiment folder"):  # a second run of the same experiment is refused
        return _run_experiment(spec, base_recipe, progress=progress)


def _run_experiment(spec: ExperimentSpec, base_recipe: dict, *, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from .train import load_run, train

    if spec.threads:
        from ..models import set_threads

        set_threads(spec.threads)
    out = spec.out
    start = time.monotonic()
    timing = {"train_s": 0.0, "eval_s": 0.0, "merge_s": 0.0}  # merge_s includes the interference analysis
    first = load_recipe(recipe_for(base_recipe, next(iter(spec.methods.values())), spec.tasks[0], spec.seeds[0],
                                   out, "x", spec.task_overrides.get(spec.tasks[0])))
    model_name = first.model.name_or_path
    ekw = _eval_kwargs(spec, dataclasses.asdict(first.data))
    etasks = spec.eval_tasks
    results: dict = {
        "flylora_results_version": RESULTS_VERSION, "name": spec.name, "description": spec.description,
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "model": model_name,
        "tasks": etasks, "train_tasks": spec.tasks, "seeds": spec.seeds, "methods": list(spec.methods),
        "merges": list(spec.merges), "eval": {k: v for k, v in ekw.items() if k != "progress"},
        "metric": {}, "base": {}, "single": {}, "merged": {}, "skipped": {}, "params": {}, "runs": {},
        "analysis": {}, "sources": {}, "spec": _spec_dict(spec),
    }
    stages = len(spec.methods) * len(spec.seeds) * (len(spec.tasks) * 2 + len(spec.merges))
    bar = tqdm(total=stages + int(spec.eval.include_base), desc=f"experiment {spec.name}", unit="stage",
               disable=not progress)

    def evaluate_(tasks, out_dir, **kw):
        t0 = time.monotonic()
        rep = _evaluate(tasks, model_name, out_dir, ekw, per_task=spec.eval.per_task, **kw)
        timing["eval_s"] += time.monotonic() - t0
        results["metric"].update({r["task"]: r["primary_metric"] for r in rep["results"]})
        results["sources"].update({r["task"]: r["source"] for r in rep["results"]})
        return _scores(rep)

    if spec.eval.include_base:
        results["base"] = evaluate_(etasks, out / "eval" / "base")
        bar.update()

    for label, method_overrides in spec.methods.items():
        method_name = load_recipe(recipe_for(base_recipe, method_overrides, spec.tasks[0], 0, out, label,
                                             spec.task_overrides.get(spec.tasks[0]))).method.name
        results["single"][label] = {t: {} for t in etasks}
        results["merged"][label] = {m: {t: {} for t in etasks} for m in spec.merges}
        results["runs"][label] = {}
        for seed in spec.seeds:
            runs = {}
            for task in spec.tasks:
                run_dir = spec.train_root / label / f"seed{seed}" / slug(task)
                bar.set_postfix_str(f"train {label} {task} seed {seed}")
                if not (run_dir / "run.json").is_file():
                    t0 = time.monotonic()
                    train(recipe_for(base_recipe, method_overrides, task, seed, run_dir, label,
                                     spec.task_overrides.get(task)))
                    timing["train_s"] += time.monotonic() - t0
                runs[task] = run_dir
                p = load_run(run_dir)["parameters"]
                results["params"][label] = {k: p[k] for k in ("activated_pct", "trainable_pct", "activated", "trainable")}
                bar.update()
            results["runs"][label][str(seed)] = {t: str(p) for t, p in runs.items()}
            for task in spec.tasks:  # each adapter on its own (evaluation) task
                et = spec.eval_task(task)
                bar.set_postfix_str(f"eval {label} {et} seed {seed}")
                scores = evaluate_([et], out / "eval" / label / f"seed{seed}" / slug(et),
                                   adapter=(label, str(runs[task] / "adapter")))
                results["single"][label][et][str(seed)] = scores[et]
                bar.update()
            for mlabel, m in spec.merges.items():
                bar.set_postfix_str(f"merge {label} {mlabel} seed {seed}")
                reason = merge_applies(m, label, method_name)
                if reason:
                    results["skipped"].setdefault(label, {})[mlabel] = reason
                    results["merged"][label].pop(mlabel, None)
                    bar.update()
                    continue
                info = _merge_stage(spec, m, mlabel, label, seed, runs, method_name, timing)
                edir = out / "eval_merged" / label / f"seed{seed}" / mlabel
                mdir = out / "merge" / label / f"seed{seed}" / mlabel
                kind = info["kind"]
                scores = evaluate_(etasks, edir, adapter=("merged", str(mdir)) if kind == "adapter" else None,
                                   union=str(mdir) if kind == "union" else None,
                                   full=str(mdir) if kind == "full" else None)
                if kind == "full" and not spec.keep_full_weights:
                    for f in mdir.glob("*.safetensors"):
                        f.unlink()  # big; merge.json (and the analysis) stay, and results.json is cached
                for et, score in scores.items():
                    results["merged"][label][mlabel][et][str(seed)] = score
                if info.get("analysis"):
                    results["analysis"].setdefault(label, {})[mlabel] = info["analysis"]
                bar.update()
    bar.close()
    results["timing"] = {k: round(v, 1) for k, v in timing.items()} | {"total_s": round(time.monotonic() - start, 1)}
    results["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    _write_json(out / "results.json", results)
    return results


def _merge_stage(spec: ExperimentSpec, m: MergeSpec, mlabel: str, label: str, seed: int, runs: dict,
                 method_name: str, timing: dict) -> dict:
    """merge.json of this (method, seed, merge), merging unless a finished merge (or its cached
    evaluation) is already on disk."""
    from ..merge.cli import merge_adapters

    out = spec.out
    mdir = out / "merge" / label / f"seed{seed}" / mlabel
    evaluated = (out / "eval_merged" / label / f"seed{seed}" / mlabel / "results.json").is_file()
    info = _json(mdir / "merge.json")
    if info is not None and (evaluated or _artifact_present(mdir, info)):
        return info
    if mdir.exists():  # an unfinished merge of ours; never a folder flylora did not write
        from ..fsutil import remove_ours

        remove_ours(mdir, "merge folder")
    wanted = spec.analysis is True or (isinstance(spec.analysis, list) and mlabel in spec.analysis)
    t0 = time.monotonic()
    info = merge_adapters([(spec.eval_task(t), str(runs[t])) for t in spec.tasks], m.method, mdir,
                          weights=m.weights, density=m.density, majority=m.majority, seed=m.seed,
                          dare_combine=m.dare_combine, knots_merge=m.knots_merge, output_format=m.format,
                          rank=m.rank, legacy_form=m.legacy_form,
                          analyze=bool(wanted) and seed == spec.seeds[0] and method_name in DELTA_OK,
                          analysis_prompts=spec.analysis_prompts,
                          tasks={spec.eval_task(t): spec.eval_task(t) for t in spec.tasks})
    timing["merge_s"] += time.monotonic() - t0
    return info


def _artifact_present(mdir: Path, info: dict) -> bool:
    if info.get("kind") == "full":
        return any(mdir.glob("*.safetensors"))
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flylora.pipeline.experiment", description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--report", help="also write the report to this folder (default: the experiment folder)")
    args = p.parse_args(argv)
    from ..report.tables import write_report

    results = run_experiment(args.spec, args.overrides)
    paths = write_report(results, Path(args.report) if args.report else load_spec(args.spec, args.overrides)[0].out)
    print(Path(paths["markdown"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
