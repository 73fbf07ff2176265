"""`flylora bench --quantized`: FlyLoRA (r=32, k=8, the 7 projections) on the embedded SmolLM2-135M
with a 4-bit base against a bf16 base, in one run: peak training memory and step time as ratios.

Bases (the same dequantized-GGUF weights, loaded by `flylora.models.load_model`):
  bf16          every weight bf16 (model.dtype=bfloat16)
  nf4           linear layers 4-bit NF4 (bitsandbytes Linear4bit, bf16 compute); the rest bf16
  nf4_prepared  nf4, then `prepare_model_for_kbit_training` as `flylora train` does for a quantized
                base: the non-quantized weights (embeddings/lm_head, norms) are cast to fp32
  fp4_paper     the paper recipes' loading: 4-bit fp4, fp32 compute, rest fp16, then prepared

Every step is forward + backward + AdamW on B + the routing-bias update, under bf16 autocast (the
CPU setting of the demo), at the batch of `flylora bench`'s smollm2 row. Memory and timing reuse
`flylora.bench.measure` (allocator-level peak increment + live state; interleaved repetitions, paired
ratios, median and IQR, single-thread CPU clock by default). The live state of a 4-bit base also
counts its quantization constants (one absmax per 64 weights, `weight.quant_state`), which are
not parameters or buffers.

On CPU, bitsandbytes' 4-bit training path dequantizes each weight in every forward and again in
backward, so a 4-bit step costs more time here; it saves the weight memory (about 4x on the
quantized layers), which is what QLoRA-style training is for.
"""
from __future__ import annotations

import sys
import time

BASES = ("bf16", "nf4", "nf4_prepared", "fp4_paper")
REF = "bf16"


def _load(base: str):
    from ..models import load_model
    from ..quantization import prepare_for_training

    if base == "bf16":
        return load_model(dtype="bfloat16")
    if base.startswith("nf4"):
        model = load_model(dtype="bfloat16", quantization="nf4", compute_dtype="bfloat16")
        return prepare_for_training(model, False, False) if base == "nf4_prepared" else model
    model = load_model(dtype="float16", quantization="fp4", compute_dtype="float32")
    return prepare_for_training(model, False, False)


def quant_state_bytes(model) -> int:
    """Bytes of the 4-bit layers' quantization constants (absmax, nested state, code)."""
    import torch

    from ..quantization import is_quantized_linear
    from .measure import _tensor_bytes

    ts = []
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None) if is_quantized_linear(m) else None
        while state is not None:
            ts += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    return _tensor_bytes(ts)


def build(bases=BASES) -> dict:
    import copy

    import torch
    from peft import get_peft_model

    from .cases import FLY, MODELS, Runner, _method_configs, _randomise_trainables

    spec = MODELS["smollm2"]
    cfg = _method_configs()[FLY]
    g = torch.Generator().manual_seed(1)
    runners = {}
    for i, base in enumerate(bases):
        model = _load(base)
        for p in model.parameters():
            p.requires_grad_(False)
        if i == 0:
            ids = torch.randint(0, model.config.vocab_size, (spec.batch, spec.seq), generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        model = get_peft_model(model, copy.deepcopy(cfg)).train()
        _randomise_trainables(model, seed=10)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        runners[base] = Runner(base, model, batch, True, opt, routed=True)
    return runners


def bench_quantized(reps=(5, 15), budget_s: float = 60.0, clock: str = "cpu", log=print) -> dict:
    from .measure import _interleaved, _paired, _summary, peak_step_memory

    runners = build()
    log(f"bench --quantized: {len(runners)} bases built; warming up")
    for r in runners.values():
        for _ in range(2):
            r.train_step()
    memory = peak_step_memory(runners)
    for k, r in runners.items():
        extra = quant_state_bytes(r.model)
        memory[k]["static_bytes"] += extra
        memory[k]["peak_bytes"] += extra
        memory[k]["quant_state_bytes"] = extra
    for r in runners.values():
        r.clock = clock
    log("timing training steps")
    secs, _, util = _interleaved({k: r.train_step for k, r in runners.items()}, reps, budget_s, 1, 0, clock)
    out = {"bases": {}, "reference": REF, "cpu_over_wall": _summary(util)}
    for k in runners:
        out["bases"][k] = {
            "step_s": _summary(secs[k]),
            "step_ratio_vs_bf16": _paired(secs[k], secs[REF]),
            "memory": memory[k],
            "peak_memory_ratio_vs_bf16": memory[k]["peak_bytes"] / memory[REF]["peak_bytes"],
            "static_memory_ratio_vs_bf16": memory[k]["static_bytes"] / memory[REF]["static_bytes"],
        }
    return out


def format_table(result: dict) -> str:
    lines = ["| base | peak train memory (MB) | vs bf16 | live state (MB) | vs bf16 | step s (median) | step vs bf16 (IQR) |",
             "|---|---|---|---|---|---|---|"]
    for k, b in result["bases"].items():
        m, s, r = b["memory"], b["step_s"], b["step_ratio_vs_bf16"]
        lines.append(f"| {k} | {m['peak_bytes'] / 1e6:.0f} | {b['peak_memory_ratio_vs_bf16']:.2f} | "
                     f"{m['static_bytes'] / 1e6:.0f} | {b['static_memory_ratio_vs_bf16']:.2f} | {s['median']:.3f} | "
                     f"{r['median']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}) |")
    return "\n".join(lines)


def run_quantized(args, t0: float) -> int:
    """The `--quantized` mode of `flylora bench` (called from flylora.bench.cli)."""
    import json
    from pathlib import Path

    import torch

    from .report import machine_info

    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be >= 1")
    torch.set_num_threads(args.threads)
    clock = args.clock if args.threads == 1 else "wall"
    reps = (args.reps, args.reps) if args.reps is not None else ((2, 2) if args.smoke else (5, 15))
    if reps[0] < 2:
        raise ValueError(f"--reps {args.reps}: at least 2 repetitions are needed for a spread")
    result = {"machine": machine_info(args.threads),
              "settings": {"model": "embedded:smollm2-135m-instruct", "method": "flylora r32 k8 (7 projections)",
                           "precision": "bf16 autocast", "clock": clock, "reps_min_max": list(reps)},
              **bench_quantized(reps, 0.0 if args.reps else 60.0, clock,
                                log=lambda m: print(m, file=sys.stderr, flush=True))}
    result["wall_s"] = time.perf_counter() - t0
    print(format_table(result))
    print(f"\nwall time {result['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
