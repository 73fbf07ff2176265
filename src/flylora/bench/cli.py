"""`flylora bench`: its modes and options, one flylora.bench.phases run per model, the report.

What is measured, and how, is described in the package docstring (flylora.bench).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# torch and the bench modules that import it (cases, phases, report) are imported by `run`, so
# that `flylora bench --help` imports nothing heavy

# ---------------------------------------------------------------- CLI

#: mode -> (models, (min, max) repetitions, per-phase budget in seconds, memory-only sweeps); the full
#: mode's models are all of cases.MODELS
MODES = {
    "smoke": (["tiny"], (2, 2), 0.0, {}),
    "quick": (["tiny", "mid"], (5, 20), 20.0, {}),
    "full": (["tiny", "mid", "smollm2"], (10, 40), 60.0, {"mid": (512, 1024), "smollm2": (512,)}),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny and mid-size models only, fewer repetitions (< 3 min)")
    p.add_argument("--smoke", action="store_true", help="tiny model only, 2 repetitions (seconds; for tests)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure here (default: "
                   "benchmarks/bench.json for a full run, nothing for --quick/--smoke)")  # fmt: skip
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODES['full'][0])}")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods (the reference "
                   "methods lora_r8, lora_r32 and frozen_base are always included)")  # fmt: skip
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per phase (default: 10 to 40 "
                   "within a time budget; --quick 5 to 20)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, timed by this thread's CPU "
                   "time; >1 is timed by the wall clock)")  # fmt: skip
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: the timing thread's CPU seconds (needs --threads 1); wall: elapsed seconds")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: fp32 weights under bf16 autocast (the demo's CPU setting); fp32: no autocast")
    p.add_argument("--quantized", action="store_true", help="only FlyLoRA on the embedded model with a 4-bit "
                   "base vs a bf16 base: peak training memory and step time ratios (flylora.bench.quant)")


def run(args) -> int:
    import torch

    t0, threads_before = time.perf_counter(), torch.get_num_threads()
    try:
        return _run(args, t0)
    finally:
        torch.set_num_threads(threads_before)  # run() is also called in-process (tests)


def _run(args, t0: float) -> int:
    if getattr(args, "quantized", False):
        from .quant import run_quantized

        return run_quantized(args, t0)
    from .cases import FLOOR, MODELS, REF_SIZE, REF_STEP, UNION_TASKS, _method_configs
    from .phases import Plan, bench_model
    from .report import _loadavg, format_tables, headline, machine_info

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    models, reps, budget, memory_seqs = MODES[mode]
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(models) - set(MODELS))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    if args.reps is not None:
        if args.reps < 2:
            raise ValueError(f"--reps {args.reps}: at least 2 repetitions are needed for a spread")
        reps, budget = (args.reps, args.reps), 0.0
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be >= 1")
    plan = Plan(reps, budget, args.clock, args.threads, args.precision == "bf16", memory_seqs)
    json_path = args.json or ("benchmarks/bench.json" if mode == "full" else None)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    methods = list(_method_configs())
    if args.methods:
        wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
        unknown = sorted(wanted - set(methods))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {methods}")
        methods = [m for m in methods if m in wanted | {FLOOR, REF_STEP, REF_SIZE}]
    result = {
        "machine": machine_info(args.threads),
        "settings": {"mode": mode, "precision": "fp32 weights, bf16 autocast" if plan.autocast else "fp32",
                     "reps_min_max": list(reps), "phase_budget_s": budget, "clock": args.clock,
                     "memory_sweep_seqs": memory_seqs,
                     "methods": methods, "union_tasks": list(UNION_TASKS)},
        "models": {},
    }  # fmt: skip
    for name in models:
        union = name != "tiny" or models == ["tiny"]  # the tiny model's union only when it runs alone
        result["models"][name] = bench_model(MODELS[name], methods, plan, union, log)
    head_model = "mid" if "mid" in result["models"] else models[-1]
    result["headline"] = headline(result, head_model)
    # the flat top-level keys the issue asks for (the mid-size model when it ran)
    result.update({k: v for k, v in result["headline"].items() if k != "targets"})
    from .startup import cli_startup, format_line

    # `flylora --help` wall time (the smoke test: one run, no `train --help`, to stay fast)
    result["cli_startup"] = cli_startup(reps=1, train_help=False) if mode == "smoke" else cli_startup(reps=5)
    result["machine"]["loadavg_end"] = _loadavg()
    result["wall_s"] = time.perf_counter() - t0
    print(format_tables(result))
    print(format_line(result["cli_startup"]))
    print(f"\nwall time {result['wall_s']:.0f} s; load average start {result['machine']['loadavg_start']}, "
          f"end {result['machine']['loadavg_end']}")  # fmt: skip
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {json_path}")
    return 0
