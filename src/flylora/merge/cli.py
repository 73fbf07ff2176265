"""`flylora merge`: T task adapters -> one artifact, every method exact in ΔW space.

    flylora merge runs/train/mmlu runs/train/gsm8k --method weight_average --out merged/avg
    flylora merge a=path/a b=path/b --method task_arithmetic --weights 1,-0.5 --out merged/ta
    flylora merge runs/train/* --method ties --density 0.2 --format full --out merged/ties
    flylora merge runs/train/* --method routed_union --out merged/union --analyze

Inputs are adapter folders or `flylora train` run folders (`[name=]path`; names default to the
run's task). Methods, with ΔW_i = s_i B_i A_i per adapted module (FlyLoRA: the dense all-experts
update, which is what paper Eq. 12 averages):

  weight_average   ΔW = (1/T) Σ ΔW_i                         (paper Eq. 12)
  task_arithmetic  ΔW = Σ w_i ΔW_i                           (--weights; negative = task negation)
  ties             trim to --density per task, elect sign (--majority), disjoint mean
  dare             drop with prob 1 − density, rescale by 1/density (--seed), sum or TIES (--dare-combine)
  knots            joint SVD of [ΔW_1 … ΔW_T], merge the per-task coefficients (TIES or mean)
  routed_union     FlyLoRA (and the other routed methods): every task keeps its own A_i, B_i, top-k,
                   all active at once, B_i scaled by w_i (default 1/T); routing stays intact
  legacy_average   the official FlyLoRA script: average A, B and the routing bias separately
                   (B̄Ā = (1/T²) Σ_ij B_i A_j: cross terms, not Eq. 12); kept only to compare with
                   the paper's numbers. For FlyLoRA the default output keeps the official code's
                   top-k routing over (Ā x + d̄) then B̄ (a FlyLoRA adapter storing Ā); with
                   --legacy-form dense it is the dense s·B̄·Ā LoRA, which does NOT route.

Output (--format): `adapter` writes a PEFT folder (a concatenated-rank LoRA for the linear merges,
rank Σ r_i; KnOTS in its joint basis; TIES/DARE via SVD, exact at full rank or truncated with
--rank and the error recorded); `full` writes the base model with W0 + ΔW folded in
(save_pretrained); `auto` picks adapter, except full for TIES/DARE. Every output gets merge.json.
With FlyLoRA inputs the ΔW merges are dense (top-k routing is gone); routed_union keeps it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from flylora.merge.analysis import AdapterInput

# flylora.merge.analysis (torch) is imported where it is used, so that `flylora merge --help`
# imports nothing heavy

METHODS = ("weight_average", "task_arithmetic", "ties", "dare", "knots", "routed_union", "legacy_average")
DELTA_METHODS = ("weight_average", "task_arithmetic", "ties", "dare", "knots")
FORMATS = ("auto", "adapter", "full")


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--weights: expected comma-separated numbers, got {text!r}") from None


def _check_options(method: str, n: int, weights, output_format: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r} (allowed: {', '.join(METHODS)})")
    if output_format not in FORMATS:
        raise ValueError(f"unknown format {output_format!r} (allowed: {', '.join(FORMATS)})")
    if weights is not None:
        if method in ("weight_average", "knots", "legacy_average"):
            raise ValueError(f"--weights does not apply to {method} (use task_arithmetic for weighted sums)")
        if len(weights) != n:
            raise ValueError(f"--weights has {len(weights)} values for {n} adapters")
    if method == "task_arithmetic" and weights is None:
        raise ValueError("task_arithmetic needs --weights (one per adapter, e.g. 1,1,-0.5)")
    if output_format == "auto":
        return "full" if method in ("ties", "dare") else "adapter"
    if output_format == "full" and method == "routed_union":
        raise ValueError("routed_union keeps input-dependent routing: there are no full weights; use --format adapter")
    return output_format


def _delta_merge(method: str, tasks: list, *, weights, density, majority, seed, dare_combine, knots_merge,
                 lowrank: bool):
    """(factors {module: LowRankDelta}, None) when exactly low-rank, else (None, dense {module: ΔW})."""
    from flylora.merge import methods as M

    if method == "weight_average":
        return (M.weight_average_lowrank(tasks), None) if lowrank else (None, M.weight_average(tasks))
    if method == "task_arithmetic":
        return (M.task_arithmetic_lowrank(tasks, weights), None) if lowrank else (None, M.task_arithmetic(tasks, weights))
    if method == "knots":
        kw = dict(merge=knots_merge, density=density if knots_merge == "ties" else 1.0, majority=majority)
        return (M.knots_lowrank(tasks, **kw), None) if lowrank else (None, M.knots(tasks, **kw))
    if method == "ties":
        return None, M.ties(tasks, density, majority, weights)
    if method == "dare":
        return None, M.dare(tasks, density, seed, combine=dare_combine, weights=weights, majority=majority)
    raise AssertionError(method)


def _write_lora(out: Path, factors: dict, base_name: str, info: dict, overwrite: bool) -> None:
    from safetensors.torch import save_file

    from flylora.merge.io import ADAPTER_WEIGHTS, lora_config_for, lora_state_dict, write_dir_atomically

    import torch

    config = lora_config_for(factors, base_model_name_or_path=base_name, task_type="CAUSAL_LM")
    tensors = lora_state_dict(factors, torch.float32)

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / "merge.json").write_text(json.dumps(info, indent=2) + "\n")

    write_dir_atomically(out, write, overwrite=overwrite)


def _write_full(out: Path, deltas: dict, base_name: str, dtype: str, info: dict, overwrite: bool) -> None:
    import torch

    from flylora.merge.io import merged_full_weights, write_dir_atomically
    from flylora.models import load_model, load_tokenizer, resolve_model_path

    model = load_model(base_name, dtype=dtype)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    merged = merged_full_weights(weights, deltas)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in merged and merged[name] is not weights[name]:
                p.copy_(merged[name])
    tok = load_tokenizer(resolve_model_path(base_name))

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "merge.json").write_text(json.dumps(info, indent=2) + "\n")

    write_dir_atomically(out, write, overwrite=overwrite)


def _write_legacy_routed(out: Path, inputs: list[AdapterInput], merged: dict, info: dict, overwrite: bool) -> None:
    """The official script's result as a loadable FlyLoRA adapter that routes: Ā (no longer sparse,
    the union of T supports) is stored in the file's sparse-A slots at sparsity 1 (all columns), so
    loading rebuilds exactly Ā; B̄ and d̄ are the adapter's B and routing bias."""
    import torch
    from safetensors.torch import save_file

    from flylora.merge.io import ADAPTER_WEIGHTS, write_dir_atomically

    config = dict(inputs[0].config)
    config["save_projection"] = True
    if config.get("peft_type") == "FLYLORA":
        config["sparsity"] = 1.0  # p = n: every column slot present
    config["inference_mode"] = True
    tensors = {}
    for name, f in merged.items():
        prefix = f"base_model.model.{name}"
        r, n = f.A.shape
        tensors[f"{prefix}.flylora_B"] = f.B.float().contiguous()
        tensors[f"{prefix}.flylora_A_cols"] = torch.arange(n, dtype=torch.int32).expand(r, n).contiguous()
        tensors[f"{prefix}.flylora_A_vals"] = f.A.float().contiguous()
        bias = f.route_bias if f.route_bias is not None else torch.zeros(r)
        tensors[f"{prefix}.flylora_bias"] = bias.float().contiguous()

    def write(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / "merge.json").write_text(json.dumps(info, indent=2) + "\n")

    write_dir_atomically(out, write, overwrite=overwrite)


def _write_legacy_tensorwise(out: Path, inputs: list[AdapterInput], info: dict, overwrite: bool) -> None:
    """Any other method: average every saved tensor across adapters, first adapter's config
    (exactly `fast_lora_average` in the official merge script)."""
    import torch
    from safetensors.torch import load_file, save_file

    from flylora.merge.io import ADAPTER_WEIGHTS, write_dir_atomically

    states = [load_file(str(Path(i.adapter) / ADAPTER_WEIGHTS)) for i in inputs]
    keys = set(states[0])
    for i, s in zip(inputs[1:], states[1:]):
        if set(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"legacy_average needs adapters with identical tensor names and shapes; {i.name} differs")
    avg = {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in sorted(keys)}
    config = dict(inputs[0].config, inference_mode=True)

    def write(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(avg, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / "merge.json").write_text(json.dumps(info, indent=2) + "\n")

    write_dir_atomically(out, write, overwrite=overwrite)


def merge_adapters(inputs: Sequence[str | tuple[str, str]] | Sequence[AdapterInput], method: str,
                   out_dir: str | os.PathLike, *, weights: Sequence[float] | None = None, density: float = 0.5,
                   majority: str = "total", seed: int = 0, dare_combine: str = "sum", knots_merge: str = "ties",
                   output_format: str = "auto", rank: int | None = None, legacy_form: str = "routed",
                   base_model: str | None = None, dtype: str = "float32", overwrite: bool = False,
                   analyze: bool = False, analysis_dir: str | os.PathLike | None = None,
                   analysis_prompts: int = 16, tasks: dict[str, str] | None = None) -> dict:
    """Merge `inputs` with `method` into `out_dir`; returns merge.json's dict (see module docstring).
    `kind` in the result is how to load the output: adapter, full or union."""
    from flylora.merge.analysis import AdapterInput, base_model_of, resolve_inputs

    start = time.monotonic()
    ins = list(inputs) if inputs and isinstance(inputs[0], AdapterInput) else resolve_inputs(inputs, tasks)
    fmt = _check_options(method, len(ins), None if weights is None else list(weights), output_format)
    if legacy_form not in ("routed", "dense"):
        raise ValueError(f"legacy_form must be 'routed' or 'dense', got {legacy_form!r}")
    base_name = base_model_of(ins, base_model)
    out = Path(out_dir)
    from flylora.fsutil import check_writable_target, dir_lock

    check_writable_target(out, "output folder", deleting=overwrite)  # --overwrite replaces only our folders
    if out.exists() and not overwrite:
        raise ValueError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    with dir_lock(out, "output folder"):  # a second merge into the same folder is refused
        return _merge_locked(ins, method, out, fmt, base_name, start, weights=weights, density=density,
                             majority=majority, seed=seed, dare_combine=dare_combine, knots_merge=knots_merge,
                             rank=rank, legacy_form=legacy_form, dtype=dtype, overwrite=overwrite,
                             analyze=analyze, analysis_dir=analysis_dir, analysis_prompts=analysis_prompts)


def _merge_locked(ins, method, out, fmt, base_name, start, *, weights, density, majority, seed, dare_combine,
                  knots_merge, rank, legacy_form, dtype, overwrite, analyze, analysis_dir, analysis_prompts) -> dict:
    from flylora.merge.analysis import load_task_factors

    types = sorted({i.peft_type for i in ins})
    info = {"flylora_merge_version": 1, "method": method, "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "inputs": [{"name": i.name, "adapter": i.adapter, "peft_type": i.peft_type, "task": i.task,
                        "train_split": i.train_split} for i in ins],
            "base_model": base_name, "peft_types": types,
            "options": {"weights": None if weights is None else list(weights), "density": density,
                        "majority": majority, "seed": seed, "dare_combine": dare_combine,
                        "knots_merge": knots_merge, "rank": rank, "legacy_form": legacy_form, "dtype": dtype}}
    routed_inputs = any(t in ("FLYLORA",) for t in types)
    if method in DELTA_METHODS or analyze:  # fail before loading any model
        from flylora.merge.analysis import FACTOR_TYPES

        for i in ins:
            if i.peft_type not in FACTOR_TYPES:
                raise ValueError(f"{i.name}: {i.peft_type} adapters have an input-dependent router and no ΔW = B·A "
                                 f"factors; ΔW merges and --analyze need one of {', '.join(FACTOR_TYPES)} "
                                 "(use --method routed_union or legacy_average for this method)")
    model = factors = None
    if method == "routed_union":
        from flylora.merge.union import write_routed_union

        kind = "union"
        info.update(format="union", kind=kind, note="each task keeps its own A, B, routing bias and top-k; "
                    "all adapters active at once, B_i scaled by its weight")
        write_routed_union([(i.name, i.adapter) for i in ins], out, weights, overwrite=overwrite)
        info["options"]["weights"] = list(weights) if weights is not None else [1.0 / len(ins)] * len(ins)
    elif method == "legacy_average":
        kind = "adapter"
        if len(types) != 1:
            raise ValueError(f"legacy_average needs adapters of one method, got {types}")
        if types[0] in ("FLYLORA", "LORA_FA", "LORA"):  # factor form (AdaLoRA: tensor-wise, as official)
            from flylora.merge.methods import legacy_separate_average

            model, factors = load_task_factors(ins, base_name, dtype)
            merged = legacy_separate_average([factors[i.name] for i in ins])
            if types[0] in ("FLYLORA", "LORA_FA") and legacy_form == "routed" and fmt == "adapter":
                info.update(format="adapter", kind=kind, note="official merge script: Ā, B̄, d̄ averaged "
                            "separately; loads as a FlyLoRA adapter routing top-k over (Ā x + d̄)")
                _write_legacy_routed(out, ins, merged, info, overwrite)
            elif fmt == "adapter":
                info.update(format="adapter", kind=kind, note="dense s·B̄·Ā LoRA: cross terms as in the official "
                            "script" + ("; the official code's top-k routing over Ā with d̄ is NOT reproduced"
                                    if routed_inputs else ""))
                _write_lora(out, merged, base_name, info, overwrite)
            else:
                kind = "full"
                from flylora.merge.deltas import delta_weights

                info.update(format="full", kind=kind, note="W0 + s·B̄·Ā (dense; no routing)")
                _write_full(out, delta_weights(merged), base_name, dtype, info, overwrite)
        else:
            if fmt == "full":
                raise ValueError(f"legacy_average of {types[0]} adapters is written as an adapter only")
            info.update(format="adapter", kind=kind, note="every saved tensor averaged separately, first "
                        "adapter's config (official fast_lora_average)")
            _write_legacy_tensorwise(out, ins, info, overwrite)
    else:
        model, factors = load_task_factors(ins, base_name, dtype)
        tasks_f = [factors[i.name] for i in ins]
        lowrank = fmt == "adapter" and method in ("weight_average", "task_arithmetic", "knots")
        low, dense = _delta_merge(method, tasks_f, weights=None if weights is None else list(weights),
                                  density=density, majority=majority, seed=seed, dare_combine=dare_combine,
                                  knots_merge=knots_merge, lowrank=lowrank)
        if routed_inputs:
            info["note"] = "FlyLoRA inputs merged as dense ΔW (all experts): top-k routing is not kept"
        if fmt == "full":
            kind = "full"
            info.update(format="full", kind=kind)
            if dense is None:
                from flylora.merge.deltas import delta_weights

                dense = delta_weights(low)
            _write_full(out, dense, base_name, dtype, info, overwrite)
        else:
            kind = "adapter"
            info.update(format="adapter", kind=kind)
            if low is None:
                from flylora.merge.methods import svd_truncate

                ranks = {k: min(v.shape) if rank is None else rank for k, v in dense.items()}
                low, errors = svd_truncate(dense, ranks)
                info["svd"] = {"rank": "full" if rank is None else rank, "max_relative_error": max(errors.values()),
                               "mean_relative_error": sum(errors.values()) / len(errors)}
            info["ranks"] = sorted({f.rank for f in low.values()})
            _write_lora(out, low, base_name, info, overwrite)
    info["kind"] = kind
    info["wall_s"] = round(time.monotonic() - start, 2)
    _rewrite_info(out, info)
    if analyze:
        from flylora.merge.analysis import interference_report

        if factors is None:  # routed union / tensor-wise legacy: factors not loaded yet
            model, factors = load_task_factors(ins, base_name, dtype)
        adir = Path(analysis_dir) if analysis_dir else out / "analysis"
        interference_report(ins, factors, adir, merged=(kind, str(out)), model=model, base_model=base_name,
                            n_prompts=analysis_prompts, dtype=dtype)
        info["analysis"] = str(adir / "interference.json")
        _rewrite_info(out, info)
    return info


def _rewrite_info(out: Path, info: dict) -> None:
    from flylora.fsutil import atomic_write_text

    atomic_write_text(out / "merge.json", json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("inputs", nargs="+", metavar="[NAME=]PATH",
                   help="adapter folders or `flylora train` run folders (names default to the run's task)")
    p.add_argument("--method", "-m", required=True, choices=METHODS)
    p.add_argument("--out", "-o", required=True, help="output folder (written atomically)")
    p.add_argument("--weights", help="comma-separated per-task weights (task_arithmetic, ties, dare, routed_union)")
    p.add_argument("--density", type=float, help="TIES/DARE/KnOTS-TIES kept fraction (default 0.5)")
    p.add_argument("--majority", choices=("total", "count"), help="TIES sign election (default total)")
    p.add_argument("--seed", type=int, help="DARE drop masks (default 0)")
    p.add_argument("--dare-combine", choices=("sum", "ties"), help="DARE: sum or TIES (default sum)")
    p.add_argument("--knots-merge", choices=("ties", "mean"), help="KnOTS coefficient merge (default ties)")
    p.add_argument("--format", dest="output_format", choices=FORMATS, default="auto",
                   help="adapter (PEFT folder), full (W0+ΔW, save_pretrained) or auto (full for ties/dare)")
    p.add_argument("--rank", type=int, help="adapter format for ties/dare: SVD-truncate ΔW to this rank "
                                            "(default: full rank, exact)")
    p.add_argument("--legacy-form", choices=("routed", "dense"),
                   help="legacy_average of FlyLoRA: routed (the official code: top-k over Āx + d̄, then B̄) or "
                        "dense (s·B̄·Ā LoRA; does NOT reproduce the official routing)")
    p.add_argument("--base-model", help="base model (default: the adapters' base_model_name_or_path)")
    p.add_argument("--dtype", default="float32", help="base weights dtype for loading and full output")
    p.add_argument("--task", action="append", default=[], metavar="NAME=TASK",
                   help="task of an input given as a plain adapter folder (for --analyze CKA/routing)")
    p.add_argument("--analyze", action="store_true",
                   help="interference analysis: ΔW cosines, ‖A_iA_jᵀ‖ vs theory, CKA, routing loads (JSON + PNG)")
    p.add_argument("--analysis-dir", help="where the analysis goes (default OUT/analysis)")
    p.add_argument("--analysis-prompts", type=int, help="eval prompts per task for CKA/routing (default 16)")
    p.add_argument("--overwrite", action="store_true")


# option -> (the methods that use it, its default): given for another method it would be ignored
_METHOD_OPTIONS = {
    "density": (("ties", "dare", "knots"), 0.5),
    "majority": (("ties", "dare", "knots"), "total"),
    "seed": (("dare",), 0),
    "dare_combine": (("dare",), "sum"),
    "knots_merge": (("knots",), "ties"),
    "legacy_form": (("legacy_average",), "routed"),
}


def _check_ignored(args: argparse.Namespace) -> None:
    """An option the chosen method (or output) would silently ignore is an error; then defaults."""
    for key, (methods, default) in _METHOD_OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        if getattr(args, key) is not None and args.method not in methods:
            raise ValueError(f"{flag} does not apply to --method {args.method} (used by {', '.join(methods)})")
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.method == "knots" and args.knots_merge == "mean" and args.density != 0.5:
        raise ValueError("--density does not apply to --knots-merge mean (only to its TIES merge)")
    if args.method == "dare" and args.dare_combine == "sum" and args.majority != "total":
        raise ValueError("--majority does not apply to --dare-combine sum (only to its TIES sign election)")
    if args.rank is not None and (args.method not in ("ties", "dare") or args.output_format != "adapter"):
        raise ValueError("--rank applies to ties/dare written as an adapter (--format adapter) only")
    if not args.analyze and (args.analysis_dir is not None or args.analysis_prompts is not None):
        raise ValueError("--analysis-dir/--analysis-prompts need --analyze")
    if args.analysis_prompts is None:
        args.analysis_prompts = 16
    if args.analysis_prompts < 1:
        raise ValueError(f"--analysis-prompts must be >= 1, got {args.analysis_prompts}")


def run(args: argparse.Namespace) -> int:
    _check_ignored(args)
    tasks = {}
    for spec in args.task:
        name, sep, task = spec.partition("=")
        if not sep:
            raise ValueError(f"--task {spec!r}: expected NAME=TASK")
        tasks[name] = task
    info = merge_adapters(args.inputs, args.method, args.out, weights=parse_weights(args.weights),
                          density=args.density, majority=args.majority, seed=args.seed,
                          dare_combine=args.dare_combine, knots_merge=args.knots_merge,
                          output_format=args.output_format, rank=args.rank, legacy_form=args.legacy_form,
                          base_model=args.base_model, dtype=args.dtype, overwrite=args.overwrite,
                          analyze=args.analyze, analysis_dir=args.analysis_dir,
                          analysis_prompts=args.analysis_prompts, tasks=tasks or None)
    print(f"{info['method']} of {', '.join(i['name'] for i in info['inputs'])} -> {args.out} "
          f"({info['format']}, {info['wall_s']:.1f}s)" + (f"; analysis: {info['analysis']}" if "analysis" in info else ""))
    if info.get("note"):
        print(f"note: {info['note']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flylora merge")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
