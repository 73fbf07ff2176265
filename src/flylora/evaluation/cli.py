"""`flylora eval`: evaluate a model (+ adapters) on tasks, from the command line.

The Python API is flylora.evaluation.evaluate; the option checks and the split defaults taken
from the adapters' training runs are flylora.evaluation.options. Only `run` imports the tasks and
the evaluation (torch, numpy), so `--help` and option errors import nothing heavy.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

from ..defaults import DEFAULT_MODEL
from .options import EVAL_SPLITS, LOGLIK_NORMS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", "-t", action="append", default=[],
                   help="task or group (repeatable or comma-separated); --list-tasks shows them")
    p.add_argument("--list-tasks", action="store_true", help="list tasks and groups, then exit")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"HF id or local path (default {DEFAULT_MODEL})")
    p.add_argument("--adapter", "-a", action="append", default=[], metavar="[NAME=]PATH",
                   help="PEFT adapter folder (repeatable)")
    p.add_argument("--adapter-mode", choices=("each", "stack"), default="each",
                   help="each: evaluate adapters one at a time; stack: all active together")
    p.add_argument("--include-base", action="store_true", help="also evaluate the model without adapters")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="local data file/folder for a task (PATH alone when there is one task)")
    p.add_argument("--split", choices=EVAL_SPLITS, default=None,
                   help="default: carved-test when the adapters were trained on carved-train (their run.json "
                        "says so), else test")
    p.add_argument("--carve-seed", type=int, default=None, help="default: the adapters' training carve seed, else 0")
    p.add_argument("--carve-fraction", type=float, default=None,
                   help="carved-train share (default: the adapters' training value, else 0.5)")
    p.add_argument("--limit", type=int, help="evaluate the first N rows (or a random N with --limit-seed)")
    p.add_argument("--limit-seed", type=int)
    p.add_argument("--mode", choices=("generate", "loglik"), default="generate")
    p.add_argument("--loglik-norm", choices=LOGLIK_NORMS, default="none",
                   help="log-likelihood choice: raw sum (none), per character, per token")
    p.add_argument("--template", help="prompt template (default: the task's)")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--scoring", help="scoring mode, e.g. legacy_any_digit for MMLU")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1, help="samples per HumanEval problem (pass@k)")
    p.add_argument("--k", default="1,5,10", help="pass@k values (those <= num-samples are reported)")
    p.add_argument("--samples", metavar="FILE", help="HumanEval: score a completions jsonl (task_id, completion)")
    p.add_argument("--reference", action="store_true", help="HumanEval: score the canonical solutions")
    p.add_argument("--sandbox-workers", type=int, help="parallel sandboxed programs (default min(4, cores))")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per HumanEval program")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--quantization", default="none", choices=("none", "nf4", "fp4", "int8"),
                   help="load the base's linear layers 4-bit (nf4, fp4) or 8-bit via bitsandbytes (default none)")
    p.add_argument("--bf16-autocast", action="store_true", help="bf16 autocast (about 2x faster on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch threads (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default runs/eval/<timestamp>, a new one per run)")
    p.add_argument("--no-progress", action="store_true")


def _parse_data(specs: list[str], names: list[str]) -> dict[str, str]:
    """--data TASK=PATH (or just PATH when there is a single task)."""
    out = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if sep and task in names:
            out[task] = path
        elif len(names) == 1 and not (sep and ":" in task):
            out[names[0]] = spec
        else:
            raise ValueError(f"--data {spec!r}: use TASK=PATH with TASK one of {names}")
    return out


def run(args: argparse.Namespace) -> int:
    if args.list_tasks:
        from ..tasks import get_task
        from ..tasks.registry import groups, list_tasks

        for n in list_tasks():
            print(f"{n:24s} {get_task(n).description}")
        for g, members in groups().items():
            print(f"group {g:18s} {', '.join(members)}")
        return 0
    from ..fsutil import ensure_dir, unique_dir

    created = not (args.out and Path(args.out).exists())
    if args.out:
        out_dir = ensure_dir(args.out, "--out folder", kind="eval")
    else:  # two evals started in the same second get two folders
        out_dir = unique_dir(Path("runs") / "eval" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        return _run(args, out_dir)
    except BaseException:
        if created and out_dir.is_dir() and all(p.name.startswith(".flylora") for p in out_dir.iterdir()):
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)  # only our marker inside: nothing to keep
        raise


def _run(args: argparse.Namespace, out_dir: Path) -> int:
    from ..tasks import expand, get_task
    from .evaluate import evaluate, markdown_table
    from .options import default_split
    from .samples import _humaneval_report, humaneval_from_completions, read_samples

    default_split(args)
    if args.no_progress:  # also transformers' own bars (model loading)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    ks = [int(k) for k in str(args.k).split(",") if k.strip()]
    progress = not args.no_progress
    if args.samples or args.reference:
        if expand(args.task or ["humaneval"]) != ["humaneval"] or (args.samples and args.reference):
            raise ValueError("--samples/--reference score HumanEval only (one of them, with --task humaneval)")
        if args.reference:
            rows = get_task("humaneval").load("test", limit=args.limit).rows
            comps = {ex["task_id"]: [ex["canonical_solution"]] for ex in rows}
            label, source = "reference (canonical solutions)", "canonical_solution"
        else:
            comps, label, source = read_samples(args.samples), f"samples:{args.samples}", args.samples
        summary, records = humaneval_from_completions(comps, ks=ks, workers=args.sandbox_workers,
                                                      timeout=args.timeout, progress=progress, source=source)
        report = _humaneval_report(summary, records, label, out_dir)
    else:
        names = expand(args.task)
        if not names:
            raise ValueError("give at least one --task (see --list-tasks)")
        report = evaluate(names, args.model, args.adapter, adapter_mode=args.adapter_mode,
                          include_base=args.include_base, data=_parse_data(args.data, names),
                          out_dir=out_dir, dtype=args.dtype, device=args.device, threads=args.threads,
                          quantization=args.quantization,
                          split=args.split, limit=args.limit, limit_seed=args.limit_seed,
                          carve_seed=args.carve_seed, carve_fraction=args.carve_fraction, mode=args.mode,
                          loglik_norm=args.loglik_norm, template=args.template, chat=args.chat_template,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, num_samples=args.num_samples,
                          ks=ks, scoring_mode=args.scoring, bf16_autocast=args.bf16_autocast,
                          seed=args.seed, sandbox_workers=args.sandbox_workers,
                          sandbox_timeout=args.timeout, progress=progress)
    sys.stdout.write(markdown_table(report))
    print(f"wrote {out_dir}/results.json, results.md, outputs/ ({report['wall_s']:.1f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flylora eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
