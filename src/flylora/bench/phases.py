"""One model's `flylora bench` run: how hard to measure (Plan), then every phase on that model:
training steps, peak step memory, inference, adapter file size, the routed union of T FlyLoRA
task adapters, and (full runs) peak memory at longer sequences."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .cases import (FLOOR, FLY, REF_SIZE, REF_STEP, TARGETS7, UNION_TASKS, ModelSpec, Runner, _share_weights_copy,
                    build_runners)
from .measure import _choose_inner, _interleaved, _paired, _summary, adapter_file_bytes, peak_step_memory


# ---------------------------------------------------------------- one model


@dataclass
class Plan:
    """How hard to measure: repetitions (min, max) per timed phase, the wall-clock budget after
    which a phase stops adding repetitions beyond the minimum, the clock, threads, precision."""

    reps: tuple[int, int]
    budget_s: float
    clock: str
    threads: int
    autocast: bool
    memory_seqs: dict = None  # model name -> longer sequence lengths for a memory-only sweep

    def __post_init__(self):
        self.memory_seqs = self.memory_seqs or {}


def bench_model(spec: ModelSpec, methods: list[str], plan: Plan, union: bool, log) -> dict:
    t_model = time.perf_counter()
    threads = spec.threads or plan.threads
    torch.set_num_threads(threads)
    clock = plan.clock if threads == 1 else "wall"  # a thread's CPU time misses its helpers' work
    runners, base = build_runners(spec, methods, plan.autocast)
    for r in runners.values():
        r.clock = clock
    n_params = sum(p.numel() for p in base.parameters())
    log(f"[{spec.name}] {spec.describe}; {n_params / 1e6:.1f} M params; batch {spec.batch} × seq {spec.seq}; "
        f"{threads} thread(s), {clock} clock; methods built in {time.perf_counter() - t_model:.1f} s")  # fmt: skip
    out: dict = {"describe": spec.describe, "params": n_params, "batch": spec.batch, "seq": spec.seq,
                 "threads": threads, "clock": clock, "methods": {}}  # fmt: skip

    # training: warm up (allocator, autocast, optimizer state), then interleaved repetitions
    for r in runners.values():
        for _ in range(2):
            r.train_step()
    calls = {k: r.train_step for k, r in runners.items()}
    inner = _choose_inner(calls, 0.05)
    step, bias, util = _interleaved(calls, plan.reps, plan.budget_s, inner, seed=2, clock=clock)
    out["train_reps"], out["train_cpu_utilisation"] = len(util), _summary(util)
    log(f"[{spec.name}] training: {len(util)} reps × {inner} step(s), CPU/wall median {statistics.median(util):.2f}")

    # memory: one profiled step each (allocations are deterministic on CPU, so once is enough)
    mem = peak_step_memory(runners)

    # inference: eval mode, no grad, adapters unmerged
    for r in runners.values():
        r.model.eval()
        for _ in range(2):
            r.infer()
    calls = {k: r.infer for k, r in runners.items()}
    inner_i = _choose_inner(calls, 0.05)
    inf, _, util_i = _interleaved(calls, plan.reps, plan.budget_s / 3, inner_i, seed=3, clock=clock)
    out["infer_reps"], out["infer_cpu_utilisation"] = len(util_i), _summary(util_i)

    sizes = {k: adapter_file_bytes(r.model) for k, r in runners.items()}
    for k, r in runners.items():
        m = {
            "step_s": _summary(step[k]),
            "infer_s": _summary(inf[k]),
            "memory": mem[k],
            "adapter_bytes": sizes[k],
            "trainable_params": sum(p.numel() for p in r.model.parameters() if p.requires_grad),
        }
        for ref in (REF_STEP, FLOOR):
            if ref in runners and k != ref:
                m[f"step_ratio_vs_{ref}"] = _paired(step[k], step[ref])
                m[f"infer_ratio_vs_{ref}"] = _paired(inf[k], inf[ref])
                m[f"peak_memory_ratio_vs_{ref}"] = mem[k]["peak_bytes"] / mem[ref]["peak_bytes"]
                m[f"step_memory_increment_ratio_vs_{ref}"] = (
                    mem[k]["step_increment_bytes"] / mem[ref]["step_increment_bytes"])
        if sizes.get(REF_SIZE) and sizes[k] and k != REF_SIZE:
            m[f"adapter_size_ratio_vs_{REF_SIZE}"] = sizes[k] / sizes[REF_SIZE]
        if r.routed:
            m["bias_update_s"] = _summary(bias[k])
            m["bias_update_share_of_step"] = _paired(bias[k], step[k])
        out["methods"][k] = m
    del runners

    if union and FLY in methods:
        out["routed_union"] = bench_union(spec, base, plan, clock, log)
    if plan.memory_seqs.get(spec.name) and FLY in methods:
        out["memory_vs_tokens"] = memory_vs_tokens(spec, plan, plan.memory_seqs[spec.name], log)
    out["wall_s"] = time.perf_counter() - t_model
    log(f"[{spec.name}] done in {out['wall_s']:.0f} s")
    return out


def memory_vs_tokens(spec: ModelSpec, plan: Plan, seqs: tuple[int, ...], log) -> dict:
    """Peak training memory of FlyLoRA, LoRA r8 and the frozen base at longer sequences (memory
    only: one warm-up step for the optimizer state, then one profiled step). FlyLoRA keeps two
    (tokens, r) tensors per layer for backward where LoRA keeps its layer input x (tokens, n),
    but FlyLoRA has twice LoRA r8's trainable parameters (Adam state): the balance moves with
    the number of tokens per step, which the timing batch alone does not show."""
    res = {}
    for seq in seqs:
        sized = ModelSpec(spec.name, spec.describe, spec.build, spec.batch, seq, spec.threads)
        runners, _ = build_runners(sized, [FLOOR, REF_STEP, FLY], plan.autocast)
        for r in runners.values():
            r.train_step()
        mem = peak_step_memory(runners)
        tokens = spec.batch * seq
        res[str(tokens)] = {
            "seq": seq, "memory": mem,
            "flylora_peak_ratio_vs_lora_r8": mem[FLY]["peak_bytes"] / mem[REF_STEP]["peak_bytes"],
            "flylora_increment_ratio_vs_lora_r8": mem[FLY]["step_increment_bytes"] / mem[REF_STEP]["step_increment_bytes"],
        }  # fmt: skip
        log(f"[{spec.name}] memory at {tokens} tokens: FlyLoRA / LoRA r8 peak "
            f"{res[str(tokens)]['flylora_peak_ratio_vs_lora_r8']:.3f}")  # fmt: skip
        del runners
    return res


def bench_union(spec: ModelSpec, base: torch.nn.Module, plan: Plan, clock: str, log) -> dict:
    """Inference with T ∈ {1, 2, 4, 8} FlyLoRA task adapters active at once (each routes its own
    top-k; their outputs add), against the frozen base. Linear growth means each task costs the same."""
    from peft import get_peft_model

    import flylora

    names = [f"task{i}" for i in range(max(UNION_TASKS))]
    cfg = lambda i: flylora.FlyLoraConfig(r=32, k=8, projection_seed=100 + i, target_modules=TARGETS7)  # noqa: E731
    model = get_peft_model(_share_weights_copy(base), cfg(0), adapter_name=names[0])
    for i, n in enumerate(names[1:], 1):
        model.add_adapter(n, cfg(i))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".flylora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    model.eval()
    ids = torch.randint(0, base.config.vocab_size, (spec.batch, spec.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    floor = Runner(FLOOR, _share_weights_copy(base).eval(), batch, plan.autocast)
    union = Runner("union", model, batch, plan.autocast)

    # set_adapter walks every module; keep it out of the timed call
    prepare = {f"T={t}": (lambda t=t: model.base_model.set_adapter(names[:t])) for t in UNION_TASKS}
    calls = {FLOOR: floor.infer, **{f"T={t}": union.infer for t in UNION_TASKS}}
    for k, fn in calls.items():
        prepare.get(k, lambda: None)()
        for _ in range(2):
            fn()
    wall, _, util = _interleaved(calls, plan.reps, plan.budget_s / 3, 1, seed=4, clock=clock, prepare=prepare)
    res = {"tasks": list(UNION_TASKS), "floor_s": _summary(wall[FLOOR]), "reps": len(util),
           "cpu_utilisation": _summary(util)}  # fmt: skip
    for t in UNION_TASKS:
        k = f"T={t}"
        res[k] = {"infer_s": _summary(wall[k]), "ratio_vs_frozen_base": _paired(wall[k], wall[FLOOR])}
    # overhead over the base per T (paired medians), then a least-squares line through them
    over = [res[f"T={t}"]["ratio_vs_frozen_base"]["median"] - 1.0 for t in UNION_TASKS]
    res["overhead_vs_base"] = dict(zip(map(str, UNION_TASKS), over))
    res["overhead_per_task"] = {str(t): o / t for t, o in zip(UNION_TASKS, over)}
    slope, icpt, r2 = _line(list(UNION_TASKS), over)
    res["linear_fit"] = {"slope_per_task": slope, "intercept": icpt, "r2": r2}
    # linear (or better) growth: the per-task overhead at T=8 is no larger than at T=1
    res["superlinearity"] = res["overhead_per_task"][str(max(UNION_TASKS))] / max(res["overhead_per_task"]["1"], 1e-9)
    log(f"[{spec.name}] routed union: overhead vs base " + ", ".join(f"T={t}: {o:+.1%}" for t, o in zip(UNION_TASKS, over)))
    return res


def _line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    icpt = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    return slope, icpt, (1 - ss_res / ss_tot) if ss_tot > 0 else 1.0
