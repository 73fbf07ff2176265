"""`flylora bench`: FlyLoRA against PEFT LoRA, the sibling methods and the frozen base, on this machine.

One run measures every (model, method) pair under the same conditions and reports RATIOS, since
absolute CPU times say little outside this machine:

  step      one training step: forward + backward + AdamW step (+ FlyLoRA's routing-bias update)
  memory    peak bytes live during one training step (see `peak_step_memory`)
  infer     one no-grad forward over the same batch, adapters unmerged (eval mode)
  adapter   bytes of `adapter_model.safetensors` written by `save_pretrained`
  bias      `update_routing_bias(model)` alone, as a share of the FlyLoRA step that contains it
  union     inference with T FlyLoRA task adapters active at once (`base_model.set_adapter([...])`)
  tokens    (full run) peak training memory of FlyLoRA vs LoRA r8 at longer sequences

Methods (all on the same 7 projections q,k,v,o,gate,up,down, dropout 0 for all so the comparison
is of the methods, not of dropout masks): FlyLoRA r32/k8, PEFT LoRA r8 and r32, TopLoRA r8,
MoE-LoRA 20×4 top-10, and the frozen base. The frozen base has nothing to train, so its "step" is
the floor every adapter pays anyway: forward + backward w.r.t. the input embeddings (detached,
`requires_grad`), which back-propagates through every layer exactly as adapters in layer 0 need,
with no optimizer step.

Timing method. Each model's methods are built once (sharing the frozen base weights, so memory
stays small) and warmed up; then every repetition runs each method once, in a fresh random order,
back to back. A ratio is taken *within* a repetition (method / reference, timed seconds apart) and
the median over repetitions is reported with its IQR: load that drifts during the run slows both
sides of a pair, so paired ratios are far steadier than ratios of separate medians.

Clock and threads. By default one torch thread, timed by that thread's CPU time
(`time.thread_time`): what the step costs on a core of its own. The machine this was written on
has 2 cores shared with other people's test runs; with 2 threads and wall time, every op's
fork/join waits whenever the other core is taken, which inflates op-heavy methods (many small
adapter ops) more than GEMM-heavy ones: it biased ratios by up to ~40% in our runs, with IQRs of
tens of percent. The single-thread CPU clock gave IQRs of a few percent under the same load
(benchmarks/RESULTS.md has both). `--threads N`
(N > 1) times with the wall clock instead; use it on an idle machine. Process CPU time over
wall time is recorded per repetition as a contention check (about 1 per thread when idle).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

TARGETS7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNION_TASKS = (1, 2, 4, 8)
REF_STEP, REF_SIZE, FLOOR, FLY = "lora_r8", "lora_r32", "frozen_base", "flylora_r32k8"


# ---------------------------------------------------------------- what is measured


@dataclass
class ModelSpec:
    name: str
    describe: str
    build: Callable[[], torch.nn.Module]
    batch: int
    seq: int
    #: torch threads for this model; None = the run's --threads. The tiny model's ops take
    #: microseconds: a second thread only adds fork/join cost, and on a shared machine a
    #: descheduled worker thread stalls every op, so it runs single-threaded.
    threads: Optional[int] = None


def _llama(**kw) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **kw)).float()


def _smollm2() -> torch.nn.Module:
    from .models import load_model

    return load_model()  # fp32, converted once from the shipped GGUF and cached


MODELS = {
    "tiny": ModelSpec(
        "tiny", "Llama h64 i128 2 layers, vocab 256 (random init)",
        lambda: _llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256), batch=2, seq=32, threads=1),
    "mid": ModelSpec(
        "mid", "Llama h1024 i2816 4 layers, 16 heads / 4 kv, vocab 8192 (random init)",
        lambda: _llama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=8192), batch=2, seq=128),
    "smollm2": ModelSpec(
        "smollm2", "SmolLM2-135M (embedded default model: h576 i1536 30 layers, vocab 49152)",
        _smollm2, batch=2, seq=64),
}  # fmt: skip


def _method_configs() -> dict[str, Optional[object]]:
    from peft import LoraConfig

    import flylora

    return {
        FLOOR: None,
        FLY: flylora.FlyLoraConfig(r=32, k=8, lora_alpha=64, projection_seed=0, target_modules=TARGETS7),
        "lora_r8": LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS7),
        "lora_r32": LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS7),
        "toplora_r8": flylora.TopLoraConfig(r=8, lora_dropout=0.0, target_modules=TARGETS7),
        "moelora_20x4_top10": flylora.MoeLoraConfig(
            num_experts=20, expert_r=4, top_k=10, lora_dropout=0.0, target_modules=TARGETS7),
    }  # fmt: skip


@dataclass
class Runner:
    """One method on one model, ready to step: the (PEFT) model, its optimizer, fixed inputs."""

    method: str
    model: torch.nn.Module
    batch: dict
    autocast: bool
    opt: Optional[torch.optim.Optimizer] = None
    routed: bool = False
    clock: str = "wall"  # the clock the bias update is timed with: the one the step is timed with

    def _ctx(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)

    def train_step(self) -> float:
        """One step; returns the seconds spent in update_routing_bias (0 for non-routed methods)."""
        from .balance import update_routing_bias

        with self._ctx():
            if self.opt is None:  # frozen base: backprop to the (detached) input embeddings
                emb = self.model.get_input_embeddings()(self.batch["input_ids"]).detach().requires_grad_(True)
                out = self.model(inputs_embeds=emb, attention_mask=self.batch["attention_mask"], labels=self.batch["labels"])
            else:
                out = self.model(**self.batch)
        out.loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if not self.routed:
            return 0.0
        tick = _clock(self.clock)
        t = tick()
        update_routing_bias(self.model)
        return tick() - t

    @torch.no_grad()
    def infer(self) -> None:
        with self._ctx():
            self.model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"])


def _share_weights_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters are the *same* tensors as base's: every method wraps its own
    module tree but the frozen weights exist once, so seven methods cost one model's memory."""
    memo = {id(p): p for p in base.parameters()}
    return copy.deepcopy(base, memo)


@torch.no_grad()
def _randomise_trainables(model: torch.nn.Module, seed: int) -> None:
    """Zero-initialised adapter tensors (LoRA/FlyLoRA B) get small random values, so that no
    timing runs on exact zeros and every method computes a real update from the first step."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 1e-3)


def build_runners(spec: ModelSpec, methods: list[str], autocast: bool) -> tuple[dict[str, Runner], torch.nn.Module]:
    from peft import get_peft_model

    base = spec.build().eval()
    for p in base.parameters():
        p.requires_grad_(False)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (spec.batch, spec.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    configs = _method_configs()
    runners = {}
    for i, method in enumerate(methods):
        cfg = configs[method]
        if cfg is None:
            runners[method] = Runner(method, _share_weights_copy(base).train(), batch, autocast)
            continue
        model = get_peft_model(_share_weights_copy(base), copy.deepcopy(cfg)).train()
        _randomise_trainables(model, seed=10 + i)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        runners[method] = Runner(method, model, batch, autocast, opt, routed=(method == FLY))
    return runners, base


# ---------------------------------------------------------------- timing


def _clock(kind: str) -> Callable[[], float]:
    """cpu: CPU seconds of this thread (single-threaded runs only): what the call costs on a core
    of its own, unmoved by other processes' time slices; wall: perf_counter."""
    return time.thread_time if kind == "cpu" else time.perf_counter


def _interleaved(calls: dict[str, Callable[[], float]], reps: tuple[int, int], budget_s: float, inner: int,
                 seed: int, clock: str, prepare: Optional[dict[str, Callable[[], None]]] = None):
    """Repetitions of (every call once, in a fresh shuffled order, `inner` times each), at least
    reps[0] and at most reps[1] of them, stopping after reps[0] once budget_s has passed. Returns
    per-name lists of seconds per call and of the calls' return values (bias-update seconds) per
    call, and each repetition's CPU time over wall time (contention check). `prepare[name]()`, if
    given, runs untimed before that name's calls."""
    rng, tick = random.Random(seed), _clock(clock)
    secs = {k: [] for k in calls}
    extra = {k: [] for k in calls}
    util = []
    names = list(calls)
    start = time.perf_counter()
    while len(util) < reps[1] and (len(util) < reps[0] or time.perf_counter() - start < budget_s):
        rng.shuffle(names)
        c0, w0 = time.process_time(), time.perf_counter()
        for k in names:
            if prepare and k in prepare:
                prepare[k]()
            t0, x = tick(), 0.0
            for _ in range(inner):
                x += calls[k]() or 0.0
            secs[k].append((tick() - t0) / inner)
            extra[k].append(x / inner)
        util.append((time.process_time() - c0) / max(time.perf_counter() - w0, 1e-9))
    return secs, extra, util


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _summary(xs: list[float]) -> dict:
    q1, med, q3 = _quartiles(xs)
    return {"median": med, "q1": q1, "q3": q3, "min": min(xs), "max": max(xs), "n": len(xs)}


def _paired(num: list[float], den: list[float]) -> dict:
    return _summary([a / b for a, b in zip(num, den)])


def _choose_inner(calls: dict[str, Callable[[], float]], target_s: float) -> int:
    """Calls per sample so that one sample lasts about target_s (tiny models take milliseconds)."""
    slowest = 0.0
    for fn in calls.values():
        t = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - t)
    return max(1, min(100, math.ceil(target_s / max(slowest, 1e-6))))


# ---------------------------------------------------------------- memory


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared or tied tensors count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.device.type != "cpu":
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _live_state(r: Runner) -> list:
    ts = list(r.model.parameters()) + list(r.model.buffers()) + [p.grad for p in r.model.parameters()]
    if r.opt is not None:
        for state in r.opt.state.values():
            ts += [v for v in state.values() if torch.is_tensor(v)]
    return ts


def peak_step_memory(runners: dict[str, Runner]) -> dict[str, dict]:
    """Peak bytes live during one training step of each runner, from the CPU allocator itself.

    With `profile_memory=True` the profiler records every c10 CPU allocation and free together
    with the allocator's running total of bytes allocated while profiling. A step's peak
    *increment* is the maximum of that total during the step minus its value just before the
    step's first allocation: activations saved for backward, gradients, optimizer temporaries,
    autocast copies and every other temporary, at their true sizes, at the moment they coexist.
    (RSS would also count allocator caching and other threads' arenas and moves by whole pages:
    too noisy for ratios.) To the increment we add the state already live when the step starts
    (weights, buffers, optimizer moments; gradients are None between steps), counted once per
    distinct storage. All steps run in one profiler session, each inside a named range.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    static = {k: _tensor_bytes(_live_state(r)) for k, r in runners.items()}
    with tempfile.TemporaryDirectory() as d:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for k, r in runners.items():
                with record_function(f"flylora-bench::{k}"):
                    r.train_step()
        trace = os.path.join(d, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    spans = {
        e["name"].split("::", 1)[1]: (e["ts"], e["ts"] + e["dur"])
        for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("flylora-bench::")
    }  # fmt: skip
    mem = sorted(
        ((e["ts"], e["args"]) for e in events
         if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
        key=lambda te: (te[0], te[1].get("Ev Idx", 0)))  # fmt: skip
    out = {}
    for k in runners:
        lo, hi = spans[k]
        inside = [a for ts, a in mem if lo <= ts <= hi]
        if not inside:
            raise RuntimeError(f"the profiler recorded no CPU memory events for {k}")
        start = inside[0]["Total Allocated"] - inside[0]["Bytes"]
        increment = max(a["Total Allocated"] for a in inside) - start
        out[k] = {"static_bytes": static[k], "step_increment_bytes": increment, "peak_bytes": static[k] + increment}
    return out


def adapter_file_bytes(model: torch.nn.Module) -> Optional[int]:
    if not hasattr(model, "save_pretrained") or not hasattr(model, "peft_config"):
        return None
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(p.stat().st_size for p in Path(d).rglob("adapter_model.*"))


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
            lines.append(f"  overhead per task: " + ", ".join(f"T={t}: {u['overhead_per_task'][str(t)]:+.1%}"
                         for t in u["tasks"]) + f"; line fit R² {u['linear_fit']['r2']:.3f}")  # fmt: skip
    h = result.get("headline")
    if h:
        note = "" if h["headline_model"] == "mid" else "; the targets are set for the mid-size model, shown for reference"
        lines.append(f"\n## targets (model: {h['headline_model']}{note})")
        for k, t in h["targets"].items():
            lines.append(f"  {'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.4g}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

#: mode -> (models, (min, max) repetitions, per-phase budget in seconds, memory-only sweeps)
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
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
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
                   "base vs a bf16 base: peak training memory and step time ratios (flylora.bench_quant)")


def run(args) -> int:
    t0, threads_before = time.perf_counter(), torch.get_num_threads()
    try:
        return _run(args, t0)
    finally:
        torch.set_num_threads(threads_before)  # run() is also called in-process (tests)


def _run(args, t0: float) -> int:
    if getattr(args, "quantized", False):
        from .bench_quant import run_quantized

        return run_quantized(args, t0)
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
    from .bench_startup import cli_startup, format_line

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
