"""`make gpu-check`: one prepared process that proves the CUDA path, ≤ 8 minutes on one GPU.

    python benchmarks/gpu_check.py                      # the full CUDA run -> benchmarks/gpu/
    python benchmarks/gpu_check.py --device cpu --tiny  # same code paths on CPU, in seconds

Sections (models are built from configs with random weights: nothing is downloaded):
  1. parity    FlyLoRA / TopLoRA / MoE-LoRA forward and B-gradients, device fp32 vs CPU fp32, and
               under bf16 / fp16 autocast, with expert-selection agreement (gpucheck/parity.py)
  2. training  20 steps of a ~1B Llama (h2048, 16 layers) in bf16 with gradient checkpointing:
               FlyLoRA r32/k8 vs PEFT LoRA r8, r32 vs frozen base; step-time ratios, peak CUDA
               memory, tokens/s; again on an NF4 4-bit base where bitsandbytes runs (training.py)
  3. syncs     the routing-bias update's share of a step; host syncs in the steps (syncs.py)
  4. decode    unmerged FlyLoRA vs LoRA decode latency per token at batch 1 and 16 (decode.py)

A global time guard (--budget-s, default 480) skips what would not finish, with a note, rather
than run over. A section that fails is recorded (type, message, last frames) and the others
still run; the exit status is then 1. Writes gpu_check.json and gpu_check.md to --out
(default benchmarks/gpu/; with --tiny a fresh temporary folder, so a tiny run never overwrites
measured GPU results).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ("parity", "training_bf16", "decode", "training_4bit")  # run in this order: most wanted first
SECTION_NEED_S = {"parity": 15, "training_bf16": 60, "decode": 30, "training_4bit": 60}  # full-size minimum


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device under test (default cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny models and few steps: seconds, same code paths")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/gpu/, or a temp folder with --tiny)")
    p.add_argument("--budget-s", type=float, default=480.0, help="global time guard in seconds (default 480)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(chosen) - set(SECTIONS))
    if bad or not chosen:
        p.error(f"--sections {args.sections!r}: unknown {bad}; allowed: {','.join(SECTIONS)}")
    if not args.budget_s > 0:
        p.error(f"--budget-s {args.budget_s!r}: must be > 0")
    args.sections = [s for s in SECTIONS if s in chosen]
    return args


@contextlib.contextmanager
def quiet_third_party():
    """Known third-party noise off for the run, and put back afterwards (the test runs main()
    in-process, next to tests that look at transformers' logs)."""
    from transformers.utils import logging as hf_logging

    names = ("transformers", "bitsandbytes", "peft")
    levels = {n: logging.getLogger(n).level for n in names}
    hf_level = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
        warnings.filterwarnings("ignore", message=".*use_cache=True.*")
        hf_logging.set_verbosity_error()
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            hf_logging.set_verbosity(hf_level)
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def headline(sections: dict) -> dict:
    """The figures a closing note quotes, flat."""
    h = {}
    t = sections.get("training_bf16", {})
    h.update({f"bf16_{k}": v for k, v in t.get("ratios", {}).items()})
    h.update({f"4bit_{k}": v for k, v in sections.get("training_4bit", {}).get("ratios", {}).items()})
    fly = t.get("methods", {}).get("flylora_r32k8", {})
    if "bias_update" in fly:
        h["bias_update_share_of_step"] = fly["bias_update"]["share_of_step"]
    for m, r in t.get("methods", {}).items():
        h[f"sync_ops_per_step[{m}]"] = r["syncs"]["profiler"]["sync_ops_per_step"]
        h[f"sync_ops_in_flylora_per_step[{m}]"] = r["syncs"]["profiler"]["sync_ops_in_flylora_per_step"]
        if r["syncs"]["debug_mode"]["available"]:
            h[f"cuda_sync_warnings[{m}]"] = r["syncs"]["debug_mode"]["sync_warnings"]
    h.update({f"decode_{k}": v for k, v in sections.get("decode", {}).get("ratios", {}).items()})
    for m, r in sections.get("parity", {}).get("methods", {}).items():
        h[f"parity_fp32_logits_max_abs_diff[{m}]"] = r["fp32"]["logits_max_abs_diff"]
        h[f"parity_fp32_b_grad_max_abs_diff[{m}]"] = r["fp32"]["b_grad_max_abs_diff"]
    return h


def run(args: argparse.Namespace) -> tuple[dict, int]:
    import torch

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from gpucheck import decode, parity, report, training
    from gpucheck.common import FULL, TINY, Budget, Device

    from flylora.bench.report import machine_info

    budget = Budget(args.budget_s)
    device = Device(args.device)
    sizes = TINY if args.tiny else FULL
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[{budget.elapsed():6.1f} s] {msg}", flush=True))
    runners = {
        "parity": lambda: parity.run_parity(sizes, device, budget, log),
        "training_bf16": lambda: training.run_training(sizes, device, budget, log),
        "decode": lambda: decode.run_decode(sizes, device, budget, log),
        "training_4bit": lambda: training.run_training(sizes, device, budget, log, quantized=True),
    }
    sections, errors = {}, {}
    for name in args.sections:
        need = 1.0 if args.tiny else SECTION_NEED_S[name]
        if not budget.allows(name, need):
            continue
        try:
            sections[name] = runners[name]()
            errors.update(sections[name].pop("errors", {}))  # per-method failures inside the section
        except Exception as e:  # record and go on: one GPU session must yield every section it can
            errors[name] = {"error": f"{type(e).__name__}: {e}",
                            "frames": traceback.format_exc().strip().splitlines()[-12:]}  # fmt: skip
            log(f"{name}: FAILED {type(e).__name__}: {e}")
            device.free()
    result = {
        "settings": {"device": device.type, "tiny": args.tiny, "budget_s": args.budget_s, "sections": args.sections,
                     "device_info": device.info(), "sizes": repr(sizes)},
        "machine": machine_info(torch.get_num_threads()),
        "sections": sections, "errors": errors, "skipped": budget.skipped,
        "headline": headline(sections), "wall_s": budget.elapsed(),
    }  # fmt: skip
    if args.out:
        out = Path(args.out)
    else:  # a tiny run never lands where the measured GPU results live
        out = Path(tempfile.mkdtemp(prefix="gpu_check-tiny-")) if args.tiny else HERE / "gpu"
    js, md = report.write_result(out, result)
    if not args.quiet:
        print(report.markdown(result))
        print(f"wrote {js} and {md}")
    return result, 1 if errors else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False (torch "
              f"{torch.__version__}); run `python benchmarks/gpu_check.py --device cpu --tiny` to exercise the "
              "code paths on CPU", file=sys.stderr)  # fmt: skip
        return 2
    t = time.perf_counter()
    with quiet_third_party():
        _, rc = run(args)
    if not args.quiet:
        print(f"gpu_check: {time.perf_counter() - t:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
