"""The markdown tables of a gpu_check result, and atomic writes of the result files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def _f(x: Optional[float], fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def _gib(b: Optional[int]) -> str:
    return "—" if b is None else f"{b / 2**30:.2f}"


def parity_table(p: dict) -> list[str]:
    lines = [f"### 1. Parity: {p['tested']} vs {p['reference']} ({p['model']}; batch {p['batch'][0]}×{p['batch'][1]})"]
    if p.get("note"):
        lines.append(f"_{p['note']}_")
    lines += ["", "| method | precision | logits max Δ | B-grad max Δ | selection exact-set | selection slots |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for method, r in p["methods"].items():
        for prec in ("fp32", "bf16", "fp16"):
            c, a = r[prec], r[prec]["selection_agreement"]
            lines.append(f"| {method} | {prec} | {c['logits_max_abs_diff']:.2e} | {c['b_grad_max_abs_diff']:.2e} | "
                         f"{_f(a and a['exact_set'], '.4f')} | {_f(a and a['slot'], '.4f')} |")
        rr = r["fp32_run_to_run"]
        lines.append(f"| {method} | fp32 run-to-run | {rr['logits_max_abs_diff']:.2e} | "
                     f"{rr['b_grad_max_abs_diff']:.2e} | | |")
        lines.append(f"| {method} | (reference max abs) | {r['ref_logits_max_abs']:.2e} | "
                     f"{r['ref_b_grad_max_abs']:.2e} | | |")
    return lines


def training_table(name: str, t: dict) -> list[str]:
    lines = [f"### 2. Training, {name}: {t['model']}; batch {t['batch'][0]}×{t['batch'][1]}; {t['precision']}"]
    if t.get("skipped"):
        return lines + [f"_skipped: {t['skipped']}_"]
    head = f"| method | step ms (median of {t['steps']}) | tokens/s | peak GiB | step increment GiB | trainable params |"
    lines += ["", head, "|---|---|---|---|---|---|"]
    for method, r in t["methods"].items():
        lines.append(f"| {method} | {r['step_s_median'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{_gib(r['peak_bytes'])} | {_gib(r['step_increment_bytes'])} | {r['trainable_params']:,} |")
    lines += [""] + [f"- {k}: {_f(v)}" for k, v in t.get("ratios", {}).items()]
    return lines


def syncs_lines(t: dict) -> list[str]:
    lines = ["### 3. Routing-bias update and host syncs (bf16 training steps)"]
    fly = t.get("methods", {}).get("flylora_r32k8")
    if fly and "bias_update" in fly:
        b = fly["bias_update"]
        lines.append(f"- bias update: {b['device_s_median'] * 1e6:.0f} µs device span = {b['share_of_step']:.3%} "
                     f"of a FlyLoRA step; host launch time {b['host_s_median'] * 1e6:.0f} µs = "
                     f"{b['host_share_of_step']:.3%}")
    for method, r in t.get("methods", {}).items():
        if "syncs" not in r:
            continue
        d, p = r["syncs"]["debug_mode"], r["syncs"]["profiler"]
        dm = (f"set_sync_debug_mode warnings: {d['sync_warnings']} in {d['steps']} step(s) {d['by_location']}"
              if d["available"] else f"set_sync_debug_mode: n/a ({d['reason']})")
        ours = p["sync_ops_in_flylora_per_step"]
        lines.append(f"- {method}: {dm}; CUDA-syncing ops per step {p['sync_ops_per_step']:g}, of them from flylora "
                     f"code: {'not attributed' if ours is None else format(ours, 'g')}; {p['sync_ops']}; "
                     f"locations {p['by_location']}; CUDA runtime syncs {p['cuda_runtime_syncs']}")
    return lines


def decode_table(d: dict) -> list[str]:
    batches = sorted({k for row in d["per_token_s"].values() for k in row}, key=lambda k: int(k.split("=")[1]))
    lines = [f"### 4. Decode latency per token, {d['adapters']} ({d['model']}; prompt {d['prompt_tokens']}, "
             f"{d['timed_tokens']} timed tokens, median)", "",
             "| method | " + " | ".join(f"ms/token {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]  # fmt: skip
    for method, row in d["per_token_s"].items():
        lines.append(f"| {method} | " + " | ".join(_f(row.get(b) and row[b] * 1e3, ".2f") for b in batches) + " |")
    lines += [""] + [f"- {k}: {_f(v)}" for k, v in d["ratios"].items()]
    return lines


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"## gpu_check: {s['device_info'].get('name', s['device'])}{' (tiny)' if s['tiny'] else ''}, "
             f"{result['wall_s']:.0f} s wall (budget {s['budget_s']:.0f} s)", ""]
    sec = result["sections"]
    if "parity" in sec:
        lines += parity_table(sec["parity"]) + [""]
    for key, name in (("training_bf16", "bf16 base"), ("training_4bit", "4-bit base")):
        if key in sec:
            lines += training_table(name, sec[key]) + [""]
    if "training_bf16" in sec:
        lines += syncs_lines(sec["training_bf16"]) + [""]
    if "decode" in sec:
        lines += decode_table(sec["decode"]) + [""]
    for k in result["skipped"]:
        lines.append(f"- skipped {k['what']}: {k['reason']}")
    for what, e in result.get("errors", {}).items():
        lines.append(f"- FAILED {what}: {e['error']}")
    return "\n".join(lines).rstrip() + "\n"


def write_atomic(path: Path, text: str) -> None:
    """temp file in the same folder, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_result(out_dir: Path, result: dict) -> tuple[Path, Path]:
    js, md = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    write_atomic(js, json.dumps(result, indent=1) + "\n")
    write_atomic(md, markdown(result))
    return js, md
