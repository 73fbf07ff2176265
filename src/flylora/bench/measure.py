"""How `flylora bench` measures: interleaved repetitions with paired ratios (median and IQR),
the clock (one thread's CPU time, or wall time), and the peak memory of one training step from
the CPU allocator's own accounting. A runner here is anything with `.model`, `.opt` and
`.train_step()` (flylora.bench.cases.Runner)."""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch


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


def _live_state(r) -> list:
    ts = list(r.model.parameters()) + list(r.model.buffers()) + [p.grad for p in r.model.parameters()]
    if r.opt is not None:
        for state in r.opt.state.values():
            ts += [v for v in state.values() if torch.is_tensor(v)]
    return ts


def peak_step_memory(runners: dict) -> dict[str, dict]:
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
