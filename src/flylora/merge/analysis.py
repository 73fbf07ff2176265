"""Model-level glue for merging and interference analysis: adapters (or `flylora train` run
folders) in, LowRankDelta factors, hidden states, CKA and routing loads out.

    inputs = resolve_inputs(["runs/train/a", "b=path/to/adapter"])
    model, factors = load_task_factors(inputs)                 # {name: {module: LowRankDelta}}
    report = interference_report(inputs, factors, out_dir, merged=("adapter", "merged/"))

`interference_report` writes interference.json plus PNGs:
  - cosines: cos(vec ΔW_i, vec ΔW_j) per module and its mean (FlyLoRA Corollary 3.5: ≈ 0 for
    independent A's), cosine_heatmap.png;
  - cross projections: ‖A_i A_jᵀ‖_F per module against Theorem 3.4's prediction p/(r√n)
    (independent sparse Gaussian A's), cross_projection.png;
  - CKA (paper Table 16): linear CKA between the single-task model's and the merged model's
    hidden states on that task's prompts (non-pad tokens), per layer, last layer and mean;
  - routing: per task, the FlyLoRA expert loads its prompts produce (normalised entropy,
    1 = even), on the single-task adapter and, for a routed union, on that task's adapter inside it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from flylora.merge.deltas import LowRankDelta, factors_from_peft_model

# ΔW-space merges need plain low-rank factors; these PEFT types have them
FACTOR_TYPES = ("LORA", "ADALORA", "FLYLORA", "LORA_FA")


@dataclass
class AdapterInput:
    """One merge input: a name (the task, by default), its adapter folder, and what we know of
    how it was trained (from run.json when the input is a `flylora train` run folder)."""

    name: str
    adapter: str
    config: dict
    task: str | None = None
    train_split: str | None = None
    carve_seed: int = 0
    carve_fraction: float = 0.5
    template: str | None = None  # the prompt template it was trained with (None: the task's own)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))

    @property
    def eval_split(self) -> str:
        """carved-test for a model trained on carved-train (never `test`, which contains it)."""
        return "carved-test" if self.train_split in ("carved-train", "carved-fit") else "test"


def resolve_inputs(specs: Sequence[str | tuple[str, str]], tasks: dict[str, str] | None = None) -> list[AdapterInput]:
    """`[name=]path` specs -> AdapterInputs. A path is an adapter folder or a run folder (run.json +
    adapter/). Names default to the run's task, else the folder name; `tasks` maps name -> task for
    plain adapter folders (needed for CKA / routing analysis only)."""
    from flylora.loading import check_adapter_dir

    out: list[AdapterInput] = []
    for spec in specs:
        if isinstance(spec, tuple):
            name, path = spec
        else:
            name, sep, path = str(spec).partition("=")
            if not sep:
                name, path = "", spec
        p = Path(path)
        run = None
        if (p / "run.json").is_file():
            run = json.loads((p / "run.json").read_text())
            p = p / run.get("adapter", "adapter")
        config = check_adapter_dir(str(p))
        task = run["data"]["task"] if run else None
        name = name or task or p.name
        if tasks and name in tasks:
            task = tasks[name]
        data = (run or {}).get("recipe", {}).get("data", {})
        out.append(AdapterInput(name=name, adapter=str(p), config=config, task=task,
                                train_split=(run or {}).get("data", {}).get("split"),
                                carve_seed=data.get("carve_seed", 0), carve_fraction=data.get("carve_fraction", 0.5),
                                template=data.get("template")))
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValueError(f"merge inputs need distinct names, got {names}; use name=path")
    if not out:
        raise ValueError("no adapters given")
    return out


def base_model_of(inputs: Sequence[AdapterInput], override: str | None = None) -> str:
    """The base model every input was trained on (override wins; otherwise they must agree)."""
    if override:
        return override
    from ..models import embedded_name_of

    # an adapter records an embedded model as its cache path (older ones as `embedded:NAME`)
    bases = {embedded_name_of(b) or b for b in (a.config.get("base_model_name_or_path") for a in inputs)}
    if len(bases) != 1 or None in bases:
        raise ValueError(f"adapters name different (or no) base models {sorted(map(str, bases))}; pass --base-model")
    return bases.pop()


def _adalora_factors(model, adapter_name: str) -> dict[str, LowRankDelta]:
    # AdaLoRA: ΔW = P diag(λ) Q · α / (ranknum + 1e-5) (PEFT SVDLinear.get_delta_weight), i.e.
    # B = P, A = λ ⊙ Q (λ scales Q's rows), scale = α / (ranknum + 1e-5)
    out = {}
    for name, layer in model.get_base_model().named_modules():
        if hasattr(layer, "lora_E") and adapter_name in getattr(layer, "lora_E", {}):
            A = (layer.lora_A[adapter_name] * layer.lora_E[adapter_name]).detach()  # (r, n)
            scale = float(layer.scaling[adapter_name]) / (float(layer.ranknum[adapter_name]) + 1e-5)
            out[name] = LowRankDelta(B=layer.lora_B[adapter_name].detach(), A=A, scale=scale)
    if not out:
        raise ValueError(f"adapter {adapter_name!r}: no AdaLoRA layers found")
    return out


def task_factors(model, inp: AdapterInput) -> dict[str, LowRankDelta]:
    if inp.peft_type not in FACTOR_TYPES:
        raise ValueError(f"{inp.name}: {inp.peft_type} adapters have an input-dependent router and no ΔW = B·A "
                         f"factors; ΔW merges need one of {', '.join(FACTOR_TYPES)} (use --method routed_union "
                         "or legacy_average for this method)")
    if inp.peft_type == "ADALORA":
        return _adalora_factors(model, inp.name)
    return factors_from_peft_model(model, inp.name)


def load_adapters(inputs: Sequence[AdapterInput], base_model: str | None = None, dtype: str = "float32"):
    """The base model with every input loaded as a named adapter (PeftModel, eval mode)."""
    from flylora.loading import load_adapter
    from flylora.models import load_model

    model = load_model(base_model_of(inputs, base_model), dtype=dtype)
    for inp in inputs:
        model = load_adapter(model, inp.adapter, adapter_name=inp.name)
    return model.eval()


def load_task_factors(inputs: Sequence[AdapterInput], base_model: str | None = None, dtype: str = "float32"):
    """(PeftModel with all inputs loaded, {name: {module: LowRankDelta}})."""
    model = load_adapters(inputs, base_model, dtype)
    return model, {inp.name: task_factors(model, inp) for inp in inputs}


# ------------------------------------------------------------------------------- hidden states
def eval_prompts(inp: AdapterInput, n: int, tokenizer=None) -> list[str]:
    """The first `n` prompts of the input's task on its evaluation split (never its training rows)."""
    from flylora.tasks import get_task

    task = get_task(inp.task)
    data = task.load(inp.eval_split, limit=n, seed=inp.carve_seed, train_fraction=inp.carve_fraction)
    return [task.build_prompt(ex, inp.template) for ex in data.rows]


@torch.no_grad()
def hidden_states(model, tokenizer, prompts: Sequence[str], batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer (embeddings + every block), the (tokens, hidden) states of all non-pad tokens."""
    per_layer: list[list[torch.Tensor]] = []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True).to(device)
        hs = model(**enc, output_hidden_states=True).hidden_states  # (L+1) × (B, T, H)
        keep = enc["attention_mask"].bool()
        for j, h in enumerate(hs):
            if len(per_layer) <= j:
                per_layer.append([])
            per_layer[j].append(h[keep].float().cpu())
    return [torch.cat(chunks) for chunks in per_layer]


def cka_per_layer(single: list[torch.Tensor], merged: list[torch.Tensor]) -> list[float]:
    from flylora.merge.interference import linear_cka

    return [linear_cka(a, b) for a, b in zip(single, merged)]


def routing_loads(model, tokenizer, prompts: Sequence[str], adapter: str) -> dict | None:
    """Normalised routing entropy (1 = even) of adapter `adapter` over FlyLoRA layers for these prompts."""
    from flylora.balance import record_routing, routing_stats

    routing_stats(model, reset=True)  # start from zero loads
    with record_routing(model):
        hidden_states(model, tokenizer, prompts)
    stats = [s for s in routing_stats(model, reset=True).values() if s["adapter"] == adapter and s["tokens"] > 0]
    if not stats:
        return None
    ratios = [s["entropy"] / s["max_entropy"] for s in stats]
    return {"layers": len(stats), "tokens_per_layer": stats[0]["tokens"],
            "normalised_entropy_mean": sum(ratios) / len(ratios), "normalised_entropy_min": min(ratios),
            "max_load_mean": sum(max(s["load"]) for s in stats) / len(stats)}


def load_merged(kind: str, path: str, base_model: str, dtype: str = "float32"):
    """The merged model: kind 'adapter' (a LoRA/FlyLoRA folder), 'union' (routed union) or 'full'."""
    from flylora.loading import load_adapter
    from flylora.merge.union import load_routed_union
    from flylora.models import load_model

    if kind == "full":
        return load_model(path, dtype=dtype)
    base = load_model(base_model, dtype=dtype)
    if kind == "union":
        return load_routed_union(base, path)
    return load_adapter(base, path, adapter_name="merged").eval()


# ------------------------------------------------------------------------------- the report
def _plot_cross_projection(summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mods = list(summary["per_module"])
    meas = [sum(r["frobenius"] for r in rows) / max(len(rows), 1) for rows in summary["per_module"].values()]
    pred = [sum((r["predicted_frobenius"] or float("nan")) for r in rows) / max(len(rows), 1)
            for rows in summary["per_module"].values()]
    fig = Figure(figsize=(max(4.0, 0.05 * len(mods) + 3), 3.2))
    ax = fig.add_subplot()
    ax.plot(range(len(mods)), meas, ".", label="measured ‖A_i A_jᵀ‖_F (mean over pairs)")
    ax.plot(range(len(mods)), pred, "_", markersize=12, label="Thm 3.4 prediction p/(r√n)")
    ax.set_xlabel("adapted module (model order)")
    ax.set_ylabel("Frobenius norm")
    ax.legend(fontsize=7, frameon=False)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def interference_report(inputs: Sequence[AdapterInput], factors: dict[str, dict[str, LowRankDelta]],
                        out_dir: str | os.PathLike, *, merged: tuple[str, str] | None = None,
                        model=None, base_model: str | None = None, n_prompts: int = 16,
                        dtype: str = "float32") -> dict:
    """Write interference.json + PNGs under out_dir; returns the JSON dict. `model` is the PeftModel
    with every input loaded (from load_task_factors); `merged` = (kind, path) enables CKA."""
    from flylora.merge.interference import cosine_summary, cross_projection_summary
    from flylora.merge.plots import plot_cosine_heatmap
    from flylora.models import load_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [i.name for i in inputs]
    tasks = [factors[n] for n in names]
    report: dict = {"tasks": names, "task_of": {i.name: i.task for i in inputs}}
    cos = cosine_summary(tasks, names)
    report["cosines"] = cos
    plot_cosine_heatmap(cos["mean_matrix"], names, out / "cosine_heatmap.png")
    if len(tasks) > 1:
        cross = cross_projection_summary(tasks, names)
        report["cross_projection"] = cross
        _plot_cross_projection(cross, out / "cross_projection.png")
    base = base_model_of(inputs, base_model)
    analysable = [i for i in inputs if i.task]
    notes = []
    if len(analysable) < len(inputs):
        notes.append("CKA/routing skipped for inputs without a known task (pass run folders or --task NAME=TASK)")
    if analysable and model is not None:
        tok = load_tokenizer(base, padding_side="right")
        prompts = {i.name: eval_prompts(i, n_prompts) for i in analysable}
        single: dict[str, list[torch.Tensor]] = {}
        routing: dict[str, dict] = {}
        for inp in analysable:
            model.base_model.set_adapter(inp.name)
            single[inp.name] = hidden_states(model, tok, prompts[inp.name])
            if inp.peft_type == "FLYLORA":
                routing[inp.name] = {"single": routing_loads(model, tok, prompts[inp.name], inp.name)}
        if merged is not None:
            merged_model = load_merged(merged[0], merged[1], base, dtype)
            cka = {}
            for inp in analysable:
                per_layer = cka_per_layer(single[inp.name], hidden_states(merged_model, tok, prompts[inp.name]))
                cka[inp.name] = {"last_layer": per_layer[-1], "mean_over_layers": sum(per_layer) / len(per_layer),
                                 "per_layer": per_layer, "prompts": len(prompts[inp.name]),
                                 "split": inp.eval_split}
                if merged[0] == "union" and inp.name in routing:
                    from flylora.merge.union import adapter_name_for

                    routing[inp.name]["in_union"] = routing_loads(merged_model, tok, prompts[inp.name],
                                                                  adapter_name_for(inp.name))
            report["cka"] = cka
            report["merged"] = {"kind": merged[0], "path": str(merged[1])}
            del merged_model
        if routing:
            report["routing"] = routing
    report["notes"] = notes
    (out / "interference.json").write_text(json.dumps(_finite(report), indent=2) + "\n")
    return report


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def interference_markdown(report: dict) -> str:
    """A short markdown summary of interference.json (used by `flylora report --interference`)."""
    lines = [f"## Interference: {', '.join(report['tasks'])}", ""]
    cos = report["cosines"]
    lines.append(f"- mean off-diagonal cos(vec ΔW_i, vec ΔW_j): {_fmt(cos.get('mean_offdiag_cos'))} "
                 f"(|cos| {_fmt(cos.get('mean_offdiag_abs_cos'))})")
    cross = report.get("cross_projection")
    if cross:
        lines.append(f"- ‖A_iA_jᵀ‖_F / Theorem 3.4 prediction, mean over modules and pairs: "
                     f"{_fmt(cross.get('mean_ratio_to_prediction'))}")
    if report.get("cka"):
        lines += ["", "| task | CKA last layer | CKA mean over layers |", "|---|---|---|"]
        for name, c in report["cka"].items():
            lines.append(f"| {name} | {_fmt(c['last_layer'])} | {_fmt(c['mean_over_layers'])} |")
    if report.get("routing"):
        lines += ["", "| task | routing entropy / log r (single) | in union |", "|---|---|---|"]
        for name, r in report["routing"].items():
            s, u = r.get("single") or {}, r.get("in_union") or {}
            lines.append(f"| {name} | {_fmt(s.get('normalised_entropy_mean'))} | "
                         f"{_fmt(u.get('normalised_entropy_mean')) if u else '–'} |")
    return "\n".join(lines + [""] + [f"note: {n}" for n in report.get("notes", [])]) + "\n"


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"
