"""`flylora demo` (what `make demo` runs): the FlyLoRA paper's multi-task experiment (Tables 1
and 2) at CPU scale, on the embedded default model and data that ship offline.

    T tasks carved from shipped validation/test sets  x  {FlyLoRA r=32 k=8, LoRA r=8, LoRA r=32}
    (same 7 target projections, steps, batch and learning rate for all)
    1. train one adapter per task and method
    2. score each adapter on its own task (log-likelihood multiple choice, held-out carved half)
    3. merge the T adapters per method: ΔW weight averaging (paper Eq. 12); FlyLoRA also the
       routed union (every task's own A, B and top-k, scaled 1/T)
    4. score every merge on every task
    5. report: Table 1/2 layout, merge-drop chart, routing-load plot of one FlyLoRA adapter,
       theory checks on the trained adapters, wall time per phase, demo.json with every figure

It runs through `flylora.pipeline.experiment` (every stage cached on disk), so a second run
skips what is done. `flylora demo --print-spec > my.yaml` writes the experiment spec; edit it and
run it with `flylora report --experiment my.yaml`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

# torch is imported where it is used, so that `flylora demo --help` imports nothing heavy
TASKS = ["cloze:sst2", "cloze:arc_e", "cloze:csqa"]
QUICK_TASKS = ["cloze:sst2", "cloze:csqa"]
FLYLORA = "flylora_r32_k8"
DEFAULT_OUT = "runs/demo"

# The training recipe every method shares. The cloze:* tasks ("Question: ...\nAnswer: <option
# text>", tasks/cloze.py) keep sequences short (CPU time is proportional to tokens) and give a
# 135M model something it can learn in a few dozen steps. The loss is on the answer only, which
# so short a run needs (the official FlyLoRA code trains on the prompt too; see recipes/paper).
RECIPE = {
    "model": {"name_or_path": "embedded:smollm2-135m-instruct"},
    "data": {"split": "carved-train", "cutoff_len": 128, "train_on_inputs": False},
    "train": {"lr": 1.0e-3, "max_steps": 24, "micro_batch_size": 8, "warmup_ratio": 0.1,
              "precision": "bf16", "logging_steps": 4, "save_steps": 8},
    "output": {"progress": False},
}
METHODS = {  # label -> recipe overrides; alpha = 2r for all three
    FLYLORA: {"method.name": "flylora", "method.config": {"r": 32, "k": 8, "lora_alpha": 64,
                                                          "bias_update_rate": 0.001}},
    "lora_r8": {"method.name": "lora", "method.config": {"r": 8, "lora_alpha": 16}},
    "lora_r32": {"method.name": "lora", "method.config": {"r": 32, "lora_alpha": 64}},
}
SPEC = {
    "name": "demo",
    "description": ("FlyLoRA (r=32, k=8) vs LoRA r=8 and r=32 on SmolLM2-135M-Instruct: one adapter per task, "
                    "then merged per method"),
    "recipe": RECIPE,
    "methods": METHODS,
    "tasks": TASKS,
    "seeds": [0],
    "eval": {"limit": 100, "mode": "loglik", "batch_size": 16, "bf16_autocast": True},
    "merges": {"weight_average": {"method": "weight_average"},
               "routed_union": {"method": "routed_union", "only": [FLYLORA]}},
    "analysis": ["weight_average"],
    "analysis_prompts": 16,
    "output_dir": DEFAULT_OUT,
}
# Seconds on a 2-core AVX512-bf16 CPU (measured): per training token, per scored token, per stage.
COST = {"train_token": 1 / 190, "eval_token": 1 / 540, "stage": 3.0, "merge": 10.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF id or local path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1; with N >= 2 the tables show mean ± std")
    p.add_argument("--steps", type=int, help=f"training steps per adapter (default {RECIPE['train']['max_steps']})")
    p.add_argument("--limit", type=int, help=f"evaluation questions per task (default {SPEC['eval']['limit']})")
    p.add_argument("--tasks", help=f"comma-separated tasks (default {','.join(TASKS)})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (about 1.5 min): 2 tasks, 3 steps, 8 questions, fp32 scoring")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, help="torch threads (default: $OMP_NUM_THREADS, else all cores)")
    p.add_argument("--print-spec", action="store_true", help="print the experiment spec as YAML and exit")
    p.add_argument("--no-progress", action="store_true")


def demo_spec(*, quick: bool = False, seeds: int = 1, model: str | None = None, steps: int | None = None,
              limit: int | None = None, tasks: list[str] | None = None, out: str = DEFAULT_OUT) -> dict:
    """The experiment spec `flylora demo` runs (see flylora.pipeline.experiment for its fields)."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    spec = copy.deepcopy(SPEC)
    recipe = spec["recipe"]
    if quick:
        spec["name"] = "demo-quick"
        spec["tasks"] = list(QUICK_TASKS)
        recipe["train"].update(max_steps=3, micro_batch_size=4, logging_steps=1, save_steps=3)
        # fp32 scoring: a second path can recompute every score (tests/test_demo.py)
        spec["eval"].update(limit=8, bf16_autocast=False)
        spec["analysis_prompts"] = 4
    for value, name in ((steps, "--steps"), (limit, "--limit")):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if steps:
        recipe["train"]["max_steps"] = steps
        recipe["train"]["save_steps"] = max(1, steps // 3)
    if limit:
        spec["eval"]["limit"] = limit
    if tasks:
        spec["tasks"] = list(tasks)
    if model:
        recipe["model"]["name_or_path"] = model
    spec["seeds"] = list(range(seeds))
    spec["output_dir"] = str(out)
    return spec


# ----------------------------------------------------------------------------------- estimate
def estimate_seconds(spec: dict) -> dict[str, float]:
    """A rough wall-time estimate per phase on a 2-core CPU, from token counts of the real data
    (training tokens at the recipe's steps × batch, scored tokens of every evaluation). Stages
    already finished in the output folder (flylora.pipeline.experiment's layout) cost nothing."""
    from ..evaluation.evaluate import load_eval_data
    from .experiment_spec import slug
    from ..models import load_tokenizer, resolve_model_path
    from ..tasks import get_task

    recipe, ev, out = spec["recipe"], spec["eval"], Path(spec["output_dir"])
    tok = load_tokenizer(resolve_model_path(recipe["model"]["name_or_path"]))
    steps, batch = recipe["train"]["max_steps"], recipe["train"]["micro_batch_size"]
    train_s, eval_s = {}, {}  # task -> seconds of one training run / one evaluation
    for name in spec["tasks"]:
        task = get_task(name)
        rows = load_eval_data(task, split="carved-test", limit=ev["limit"]).rows
        ctx = sum(len(tok(task.build_prompt(ex, recipe["data"].get("template")))["input_ids"]) for ex in rows)
        conts = [task.loglik_choices(ex)[0] for ex in rows]
        scored = ctx + sum(len(tok(c)["input_ids"]) for cs in conts for c in cs)
        answer = sum(len(tok(cs[0])["input_ids"]) for cs in conts)
        # batches pad to their longest row: about 1.3× the mean here
        train_s[name] = 1.3 * (ctx + answer) / len(rows) * steps * batch * COST["train_token"] + COST["stage"]
        eval_s[name] = (1.0 if ev.get("bf16_autocast", True) else 1.4) * scored * COST["eval_token"] + COST["stage"]
    est = {"train_s": 0.0, "eval_s": 0.0, "merge_s": 0.0}
    if not (out / "eval" / "base" / "results.json").is_file():
        est["eval_s"] += sum(eval_s.values())
    for label in spec["methods"]:
        for seed in spec["seeds"]:
            for name in spec["tasks"]:
                if not (out / "train" / label / f"seed{seed}" / slug(name) / "run.json").is_file():
                    est["train_s"] += train_s[name]
                if not (out / "eval" / label / f"seed{seed}" / slug(name) / "results.json").is_file():
                    est["eval_s"] += eval_s[name]
            for mlabel, m in spec["merges"].items():
                applies = not m.get("only") or label in m["only"]
                if applies and not (out / "eval_merged" / label / f"seed{seed}" / mlabel / "results.json").is_file():
                    est["merge_s"] += COST["merge"]
                    est["eval_s"] += sum(eval_s.values())
    est["total_s"] = sum(est.values())
    return est


# ----------------------------------------------------------------------------------- checks
def _adapter_inputs(results: dict, label: str, seed: int):
    from ..merge.analysis import resolve_inputs

    runs = results["runs"][label][str(seed)]
    return resolve_inputs([(t, runs[t]) for t in results["train_tasks"]])


def theory_checks(results: dict, out_dir: Path, n_prompts: int = 16) -> dict:
    """On the trained adapters of the first seed: pairwise cos(vec ΔW_i, vec ΔW_j) per method
    (FlyLoRA Corollary 3.5: ≈ 0 for independent A's) and ‖A_iA_jᵀ‖_F against Theorem 3.4's
    prediction p/(r√n), read from the experiment's interference analysis; for FlyLoRA also the JL
    distance ratios of its A on real layer inputs (Theorem 3.1: ‖A(x−y)‖² / (rσ²‖x−y‖²)
    concentrates around 1) and its routing load (plotted)."""
    from ..merge.analysis import load_adapters

    seed = results["seeds"][0]
    checks: dict = {"seed": seed, "methods": {}}
    for label in results["methods"]:
        if not results.get("analysis", {}).get(label):
            raise ValueError(f"the theory checks of {label} need the experiment's interference analysis "
                             "(spec `analysis: [weight_average]`)")
        report = json.loads(Path(next(iter(results["analysis"][label].values()))).read_text())
        cos = report["cosines"]
        inputs = _adapter_inputs(results, label, seed)
        entry = {"mean_offdiag_cos": cos["mean_offdiag_cos"], "mean_offdiag_abs_cos": cos["mean_offdiag_abs_cos"],
                 "cos_matrix": cos["mean_matrix"],
                 "cross_projection_ratio": report.get("cross_projection", {}).get("mean_ratio_to_prediction"),
                 "peft_type": inputs[0].peft_type}
        if entry["peft_type"] == "FLYLORA":
            model = load_adapters(inputs[:1], results["model"])
            entry["jl"], entry["routing"] = probe_flylora(model, inputs[0], n_prompts, out_dir / "routing_load.png")
            del model
        checks["methods"][label] = entry
    return checks


def probe_flylora(model, inp, n_prompts: int, png: Path) -> tuple[dict, dict]:
    """One pass of held-out prompts of the adapter's task (one at a time: no padding tokens)
    through one FlyLoRA adapter. Returns the JL ratios of every module's frozen A on the inputs
    that module really sees (consecutive token pairs) and the expert loads, plotted to `png`."""
    import torch

    with torch.no_grad():
        return _probe_flylora(model, inp, n_prompts, png)


def _probe_flylora(model, inp, n_prompts: int, png: Path) -> tuple[dict, dict]:
    import torch

    from ..balance import record_routing, routed_layers, routing_stats
    from ..merge.analysis import eval_prompts
    from ..merge.interference import jl_distance_ratios, jl_summary
    from ..models import load_tokenizer
    from ..report.plots import plot_routing_loads

    model.base_model.set_adapter(inp.name)
    tok = load_tokenizer(model.peft_config[inp.name].base_model_name_or_path)
    layers = dict(routed_layers(model))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [layer.register_forward_hook(lambda m, args, out, key=name: seen[key].append(
        args[0].detach().reshape(-1, args[0].shape[-1]).float())) for name, layer in layers.items()]
    routing_stats(model, reset=True)
    try:
        with record_routing(model):
            for prompt in eval_prompts(inp, n_prompts):
                model(**tok(prompt, return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()

    ratios = []
    for name, xs in seen.items():
        x = torch.cat(xs)  # (tokens, n)
        pairs = x.shape[0] // 2
        X, Y = x[0:2 * pairs:2], x[1:2 * pairs:2]
        keep = (X - Y).pow(2).sum(1) > 0
        ratios.append(jl_distance_ratios(layers[name].flylora_A[inp.name], X[keep], Y[keep]))
    all_ratios = torch.cat(ratios)
    jl = jl_summary(all_ratios)
    jl.update(modules=len(ratios), p05=float(all_ratios.quantile(0.05)), p95=float(all_ratios.quantile(0.95)),
              task=inp.task)

    stats = {k: s for k, s in routing_stats(model, reset=True).items() if s["adapter"] == inp.name and s["tokens"]}
    plot_routing_loads(stats, png, title=f"FlyLoRA expert load, {inp.name} adapter on {n_prompts} held-out prompts")
    entropy = [s["entropy"] / s["max_entropy"] for s in stats.values()]
    loads = torch.tensor([s["load"] for s in stats.values()])  # (modules, r)
    routing = {"task": inp.task, "layers": len(stats), "tokens_per_layer": next(iter(stats.values()))["tokens"],
               "normalised_entropy_mean": sum(entropy) / len(entropy), "normalised_entropy_min": min(entropy),
               "max_load_mean": float(loads.max(1).values.mean()), "uniform_load": 1 / loads.shape[1],
               "plot": png.name}
    return jl, routing


# ----------------------------------------------------------------------------------- report
def _binomial_se(p: float, n: int) -> float:
    return 100 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def summary_lines(results: dict, checks: dict) -> list[str]:
    """Plain statements of what the numbers say, whichever way they fall, and what they cannot."""
    from .summaries import mean_std, merge_drops

    tasks, n = results["tasks"], results["eval"]["limit"]
    single = {lbl: mean_std([mean_std(list(results["single"][lbl][t].values()))[0] for t in tasks])[0]
              for lbl in results["methods"]}
    base = mean_std([results["base"].get(t) for t in tasks])[0] if results.get("base") else None
    se = _binomial_se(0.5, n)  # the largest, at p = 0.5
    lines = ["## What this run shows, and what it does not", ""]
    lines.append(f"- Mean single-task score over {len(tasks)} tasks: "
                 + ", ".join(f"{lbl} {v:.1f}" for lbl, v in single.items())
                 + (f" (base model {base:.1f})." if base is not None else "."))
    drops = merge_drops(results)
    for mlabel, by in drops.items():
        parts = [f"{lbl} {mean_std(list(d.values()))[0]:+.1f}" for lbl, d in by.items()]
        lines.append(f"- Mean change after {mlabel} (after − single-task, points): " + ", ".join(parts) + ".")
    fly = checks["methods"].get(FLYLORA, {})
    cos = {lbl: c["mean_offdiag_abs_cos"] for lbl, c in checks["methods"].items()}
    if cos:
        lowest = min(cos, key=lambda k: cos[k])
        lines.append("- Task-vector interference, mean |cos(vec ΔW_i, vec ΔW_j)|: "
                     + ", ".join(f"{lbl} {v:.3f}" for lbl, v in cos.items())
                     + f" (lowest: {lowest}; the paper predicts FlyLoRA's ≈ 0).")
    if fly.get("cross_projection_ratio") is not None:
        lines.append(f"- FlyLoRA's frozen A's: ‖A_iA_jᵀ‖_F is {fly['cross_projection_ratio']:.3f}× the Theorem 3.4 "
                     f"prediction; JL distance ratio {fly['jl']['mean']:.3f} (5–95%: {fly['jl']['p05']:.2f}–"
                     f"{fly['jl']['p95']:.2f}, Theorem 3.1 expects ≈ 1).")
    lines += [
        f"- Noise: each score is an accuracy on {n} held-out questions, so one binomial standard error is up to "
        f"±{se:.1f} points; differences of a few points between methods are within noise"
        + (f" (seeds {results['seeds']}, mean ± std shown)." if len(results["seeds"]) > 1 else
           "; one seed, so no seed variance is shown (run `flylora demo --seeds 3`)."),
        f"- Scale: a 135M-parameter model, {results['spec']['recipe']['train']['max_steps']} training steps per "
        f"adapter on a few hundred examples, data carved from the published validation/test sets (the only "
        f"splits that ship offline), log-likelihood multiple choice. The paper fine-tunes 7–8B models for "
        f"thousands of steps and scores generations. This run shows the pipeline and the mechanics (routing, "
        f"independent projections, exact ΔW merging); it is not evidence for or against the paper's accuracy claims.",
    ]
    return lines


def theory_markdown(checks: dict) -> str:
    lines = ["## Theory checks on the trained adapters (seed %d)" % checks["seed"], "",
             "| method | mean cos(ΔW_i, ΔW_j) | mean \\|cos\\| | ‖A_iA_jᵀ‖_F / Thm 3.4 prediction | JL ratio mean ± std |",
             "|---|---|---|---|---|"]
    for lbl, c in checks["methods"].items():
        jl = c.get("jl")
        cross = c.get("cross_projection_ratio")
        cross_txt = "–" if cross is None else f"{cross:.3f}" + ("" if c["peft_type"] == "FLYLORA" else " (learned A: yardstick only)")
        lines.append(f"| {lbl} | {c['mean_offdiag_cos']:.4f} | {c['mean_offdiag_abs_cos']:.4f} | {cross_txt} | "
                     + (f"{jl['mean']:.3f} ± {jl['std']:.3f} ({jl['n_pairs']} pairs, {jl['modules']} modules)" if jl else "–")
                     + " |")
    r = checks["methods"].get(FLYLORA, {}).get("routing")
    if r:
        lines += ["", f"Routing load of the FlyLoRA {r['task']} adapter on held-out prompts: normalised entropy "
                      f"{r['normalised_entropy_mean']:.3f} on average over {r['layers']} modules (1 = perfectly even; "
                      f"min {r['normalised_entropy_min']:.3f}), mean of the busiest expert's share "
                      f"{r['max_load_mean']:.3f} (uniform {r['uniform_load']:.3f}).", "",
                  f"![routing load]({r['plot']})"]
    return "\n".join(lines) + "\n"


def write_demo_report(results: dict, checks: dict, out_dir: Path, estimate: dict, wall_s: float) -> dict:
    import torch

    from ..bench.report import machine_info
    from ..report.tables import markdown as results_markdown
    from ..report.tables import write_report

    paths = write_report(results, out_dir)
    m = machine_info(torch.get_num_threads())
    tm = results.get("timing", {})
    phases = ("| phase | estimated (s) | measured (s) |\n|---|---|---|\n" + "".join(
        f"| {k[:-2]} | {estimate.get(k, 0):.0f} | {tm.get(k, 0):.0f} |\n" for k in ("train_s", "eval_s", "merge_s"))
        + f"| theory checks | – | {checks['wall_s']:.0f} |\n| total | {estimate['total_s']:.0f} | {wall_s:.0f} |\n")
    details = Path(paths["interference"]).read_text().split("\n", 1)[1] if "interference" in paths else ""
    md = "\n".join([
        results_markdown(results).rstrip(), "", "![merge drops](merge_drops.png)", "",
        theory_markdown(checks), "\n".join(summary_lines(results, checks)), "",
        "## Wall time and machine", "",
        f"{m['cpu']}, {m['nproc']} cores, {m['threads']} torch threads, torch {m['torch']}, "
        f"Python {m['python']}. Cached stages count 0 s.", "", phases,
        "## Interference after merging (first seed)" if details else "", details,
    ])
    Path(paths["markdown"]).write_text(md)
    demo = {"results": results, "theory": checks, "estimate_s": estimate, "wall_s": round(wall_s, 1), "machine": m}
    tmp = out_dir / ".demo.json.tmp"
    tmp.write_text(json.dumps(demo, indent=2, default=str) + "\n")
    os.replace(tmp, out_dir / "demo.json")
    paths["json"] = str(out_dir / "demo.json")
    return paths


def run(args: argparse.Namespace) -> int:
    from .experiment import run_experiment
    from ..models import set_threads

    spec = demo_spec(quick=args.quick, seeds=args.seeds, model=args.model, steps=args.steps, limit=args.limit,
                     tasks=args.tasks.split(",") if args.tasks else None, out=args.out)
    if args.print_spec:
        import yaml

        print(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), end="")
        return 0
    threads = set_threads(args.threads)
    start = time.monotonic()
    out = Path(spec["output_dir"])
    est = estimate_seconds(spec)
    print(f"flylora demo: {len(spec['tasks'])} tasks ({', '.join(spec['tasks'])}) × {len(spec['methods'])} methods "
          f"({', '.join(spec['methods'])}) × {len(spec['seeds'])} seed(s) on {spec['recipe']['model']['name_or_path']}, "
          f"{spec['recipe']['train']['max_steps']} steps each, {spec['eval']['limit']} test questions per task")
    print(f"estimated time on 2 CPU cores: ~{est['total_s'] / 60:.0f} min (training {est['train_s'] / 60:.1f}, "
          f"scoring {est['eval_s'] / 60:.1f}, merging {est['merge_s'] / 60:.1f}); {threads} torch threads"
          + ("; finished stages in the output folder are reused (not counted)" if out.exists() else ""))
    results = run_experiment(spec, progress=not args.no_progress)
    t0 = time.monotonic()
    checks = theory_checks(results, out, n_prompts=spec["analysis_prompts"])
    checks["wall_s"] = round(time.monotonic() - t0, 1)
    paths = write_demo_report(results, checks, out, est, time.monotonic() - start)
    print(Path(paths["markdown"]).read_text())
    print(f"wrote {', '.join(paths.values())}")
    return 0
