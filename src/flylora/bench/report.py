"""`flylora bench`'s report: the machine it ran on, FlyLoRA's headline ratios checked against
the targets, and the per-model tables."""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch

from .cases import FLY, REF_STEP


# ---------------------------------------------------------------- report


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import peft
    import transformers

    return {
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "threads": threads,
        "loadavg_start": _loadavg(),
    }  # fmt: skip


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


TARGETS = {
    # key: (description, limit, comparison) -- all on the mid-size model
    "step_time_ratio_vs_lora_r8": ("FlyLoRA train step ≤ 1.0× PEFT LoRA r8", 1.0),
    "step_time_ratio_vs_frozen_base": ("FlyLoRA train step ≤ 1.15× frozen base", 1.15),
    "peak_memory_ratio_vs_lora_r8": ("FlyLoRA peak training memory ≤ LoRA r8", 1.0),
    "adapter_size_ratio_vs_lora_r32": ("FlyLoRA adapter file ≤ 0.55× LoRA r32", 0.55),
    "bias_update_share_of_step": ("routing-bias update ≤ 1% of a step", 0.01),
    "routed_union_superlinearity": ("routed-union overhead linear in T (per-task cost at T=8 ≤ 1.25× T=1)", 1.25),
}


def headline(result: dict, model: str) -> dict:
    """The top-level keys: FlyLoRA's ratios on `model` (medians), and each target met or missed."""
    if FLY not in result["models"][model]["methods"]:
        return {"headline_model": model, "targets": {}}
    m = result["models"][model]["methods"][FLY]
    keys = {
        "headline_model": model,
        "step_time_ratio_vs_lora_r8": m["step_ratio_vs_lora_r8"]["median"],
        "step_time_ratio_vs_frozen_base": m["step_ratio_vs_frozen_base"]["median"],
        "peak_memory_ratio_vs_lora_r8": m["peak_memory_ratio_vs_lora_r8"],
        "adapter_size_ratio_vs_lora_r32": m["adapter_size_ratio_vs_lora_r32"],
        "bias_update_share_of_step": m["bias_update_share_of_step"]["median"],
        "infer_ratio_vs_frozen_base": m["infer_ratio_vs_frozen_base"]["median"],
    }
    union = result["models"][model].get("routed_union")
    if union:
        keys["routed_union_superlinearity"] = union["superlinearity"]
        keys["routed_union_overhead_vs_base"] = union["overhead_vs_base"]
    keys["targets"] = {
        k: {"target": desc, "limit": lim, "value": keys[k], "met": bool(keys[k] <= lim)}
        for k, (desc, lim) in TARGETS.items() if k in keys
    }  # fmt: skip
    return keys


def _fmt_ratio(s: dict) -> str:
    return f"{s['median']:5.2f} [{s['q1']:.2f}–{s['q3']:.2f}]"


def format_tables(result: dict) -> str:
    lines = []
    for name, mres in result["models"].items():
        lines.append(f"\n## {name}: {mres['describe']}; batch {mres['batch']}×{mres['seq']} tokens; "
                     f"{result['settings']['precision']}, {mres['threads']} thread(s), {mres['clock']} clock, "
                     f"{mres['train_reps']} train / {mres['infer_reps']} inference reps "
                     f"(median [IQR] of paired ratios)")  # fmt: skip
        head = (f"| {'method':<20} | {'step ×lora_r8':>19} | {'step ×frozen':>19} | {'peak mem ×lora_r8':>17} "
                f"| {'infer ×frozen':>19} | {'adapter ×lora_r32':>17} | step ms | peak MB | adapter KB |")  # fmt: skip
        lines += [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
        for k, m in mres["methods"].items():
            def col(key, width=19):
                v = m.get(key)
                if v is None:
                    return f"{'1 (ref)' if key.endswith(k) else '—':>{width}}"
                return f"{_fmt_ratio(v):>{width}}" if isinstance(v, dict) else f"{v:>{width}.3f}"

            ab = m["adapter_bytes"]
            lines.append(
                f"| {k:<20} | {col('step_ratio_vs_lora_r8')} | {col('step_ratio_vs_frozen_base')} "
                f"| {col('peak_memory_ratio_vs_lora_r8', 17)} | {col('infer_ratio_vs_frozen_base')} "
                f"| {col('adapter_size_ratio_vs_lora_r32', 17)} | {m['step_s']['median'] * 1e3:7.1f} "
                f"| {m['memory']['peak_bytes'] / 2**20:7.1f} | {(ab / 1024 if ab else 0):10.1f} |")  # fmt: skip
        fly = mres["methods"].get(FLY, {})
        if "bias_update_share_of_step" in fly:
            b = fly["bias_update_share_of_step"]
            lines.append(f"routing-bias update: {fly['bias_update_s']['median'] * 1e6:.0f} µs = "
                         f"{b['median']:.3%} of a FlyLoRA step [IQR {b['q1']:.3%}–{b['q3']:.3%}]")  # fmt: skip
        mt = mres.get("memory_vs_tokens")
        if mt:
            lines.append("peak training memory at more tokens per step, FlyLoRA ×lora_r8: " + ", ".join(
                f"{tok} tokens: {v['flylora_peak_ratio_vs_lora_r8']:.3f} "
                f"({v['memory'][FLY]['peak_bytes'] / 2**20:.0f} vs {v['memory'][REF_STEP]['peak_bytes'] / 2**20:.0f} MB)"
                for tok, v in mt.items()))  # fmt: skip
        u = mres.get("routed_union")
        if u:
            lines.append("routed union (T FlyLoRA task adapters active), inference ×frozen base: " + ", ".join(
                f"T={t}: {_fmt_ratio(u[f'T={t}']['ratio_vs_frozen_base'])}" for t in u["tasks"]))
            lines.append("  overhead per task: " + ", ".join(f"T={t}: {u['overhead_per_task'][str(t)]:+.1%}"
                         for t in u["tasks"]) + f"; line fit R² {u['linear_fit']['r2']:.3f}")  # fmt: skip
    h = result.get("headline")
    if h:
        note = "" if h["headline_model"] == "mid" else "; the targets are set for the mid-size model, shown for reference"
        lines.append(f"\n## targets (model: {h['headline_model']}{note})")
        for k, t in h["targets"].items():
            lines.append(f"  {'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.4g}")
    return "\n".join(lines)
