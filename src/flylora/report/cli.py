"""`flylora report`: tables and plots from an experiment's results.json.

    flylora report runs/experiments/cpu_merge                     # results.json -> report.md + PNGs
    flylora report --experiment recipes/cpu/experiment_smollm2.yaml [key=value ...]   # run, then report
    flylora report --interference merged/avg/analysis/interference.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="?", help="results.json or the experiment folder holding it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides (with --experiment)")
    p.add_argument("--experiment", metavar="SPEC", help="run (or finish) this experiment spec first")
    p.add_argument("--interference", metavar="JSON", help="render an interference.json as markdown")
    p.add_argument("--out", help="report folder (default: next to results.json)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from .tables import load_results, write_report

    if args.interference:
        from ..merge.analysis import interference_markdown

        p = Path(args.interference)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found")
        sys.stdout.write(interference_markdown(json.loads(p.read_text())))
        return 0
    if args.experiment:
        from ..pipeline.experiment import load_spec, run_experiment

        overrides = ([args.results] if args.results else []) + list(args.overrides)
        results = run_experiment(args.experiment, overrides, progress=not args.no_progress)
        out = Path(args.out) if args.out else load_spec(args.experiment, overrides)[0].out
    elif args.results:
        results = load_results(args.results)
        src = Path(args.results)
        out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    else:
        raise ValueError("give a results.json (or its folder), --experiment SPEC or --interference JSON")
    paths = write_report(results, out)
    sys.stdout.write(Path(paths["markdown"]).read_text())
    print(f"\nwrote {', '.join(paths.values())}")
    return 0
