"""Section 3b: does a training step make the host wait for the GPU?

Two detectors, run on `n` extra steps after the timed ones:

* CUDA only: `torch.cuda.set_sync_debug_mode("warn")`, under which every synchronizing CUDA call
  (`.item()`, `float(t)`, `nonzero`, a device→host copy, `bincount` …) raises a warning at the
  Python line that made it. Warnings are counted and grouped by file:line.
* Every device: the profiler (with Python stacks) counts the aten ops that synchronize on CUDA
  (`_local_scalar_dense` is what `.item()`/`float()`/`bool()` of a tensor run; `nonzero`,
  `bincount`, `unique`, `masked_select` size their output from the data), and on CUDA the
  runtime's `cudaStreamSynchronize`/`cudaDeviceSynchronize`/`cudaEventSynchronize` calls and
  device→host memcpys. Each op is attributed to the innermost frame in the flylora package, if
  any: a count under "flylora" is a sync our code adds to the hot path. On CPU these ops cost no
  sync, but the same calls are made, so the tiny CPU run checks the code path the GPU run relies
  on. (AdamW's `.item()` on its CPU step counters is counted under "other"; it syncs nothing.)
"""
from __future__ import annotations

import collections
import os
import re
import warnings
from typing import Callable

import torch

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::_unique2",
            "aten::unique_consecutive", "aten::unique_dim", "aten::masked_select")  # fmt: skip
CUDA_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
_FRAME = re.compile(r"^(?P<file>.+\.py)\((?P<line>\d+)\): (?P<func>.+)$")


def _flylora_files() -> tuple[str, ...]:
    """The package's source files as 'flylora/…/name.py' suffixes (how profiler frames end), less
    flylora/bench/: that is the harness driving the step (its frames sit above every op of it), not
    code on a user's hot path."""
    import flylora

    root = os.path.dirname(flylora.__file__)
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            if f.endswith(".py") and not rel.startswith("bench/"):
                out.append("flylora/" + rel)
    return tuple(out)


def _attribute(event, ours: tuple[str, ...]) -> str:
    """'flylora/…py:line' of the innermost flylora frame above `event`, else 'other: file:line'."""
    first = None
    e = event.cpu_parent
    while e is not None:
        m = _FRAME.match(e.name)
        if m:
            where = f"{m['file']}:{m['line']}"
            if m["file"].replace(os.sep, "/").endswith(ours):
                return where[where.rfind("flylora/"):]
            first = first or where
        e = e.cpu_parent
    return f"other: {first or 'no python frame'}"


def profile_syncs(step: Callable[[], None], device, n: int, stacks: bool = True) -> dict:
    """Counts of CUDA-syncing ops in `n` steps; with `stacks`, each attributed to its caller (the
    Python stacks cost ~10x a step's host time, so the control methods are counted without)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.cuda else [])
    with profile(activities=acts, with_stack=stacks) as prof:
        for _ in range(n):
            step()
        device.sync()  # our own closing sync, outside the steps: subtracted below
    ours = _flylora_files()
    ops, where = collections.Counter(), collections.Counter()
    runtime = collections.Counter()
    for e in prof.events():
        if e.name in SYNC_OPS:
            ops[e.name] += 1
            if stacks:
                where[_attribute(e, ours)] += 1
        elif e.name in CUDA_SYNC_CALLS:
            runtime[e.name] += 1
        elif "memcpy dtoh" in e.name.lower():  # the device side of a device->host copy
            runtime["memcpy DtoH"] += 1
    if device.cuda and runtime["cudaDeviceSynchronize"]:
        runtime["cudaDeviceSynchronize"] -= 1
    in_flylora = sum(v for k, v in where.items() if not k.startswith("other"))
    return {
        "steps": n, "sync_ops": dict(ops), "by_location": dict(where.most_common(12)),
        "sync_ops_per_step": sum(ops.values()) / n,
        "sync_ops_in_flylora_per_step": in_flylora / n if stacks else None,
        "cuda_runtime_syncs": {k: v for k, v in runtime.items() if v} if device.cuda else None,
    }  # fmt: skip


def debug_mode_syncs(step: Callable[[], None], device, n: int) -> dict:
    """CUDA's own detector: synchronizing calls made while `set_sync_debug_mode("warn")` is on."""
    if not device.cuda:
        return {"available": False, "reason": "torch.cuda.set_sync_debug_mode needs a CUDA device"}
    where = collections.Counter()
    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(old)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            f = w.filename.replace(os.sep, "/")
            where[f"{f[f.rfind('flylora/'):] if 'flylora/' in f else f}:{w.lineno}"] += 1
    return {"available": True, "steps": n, "sync_warnings": sum(where.values()),
            "by_location": dict(where.most_common(12))}  # fmt: skip


def detect_syncs(step: Callable[[], None], device, n: int, stacks: bool = True) -> dict:
    return {"debug_mode": debug_mode_syncs(step, device, n), "profiler": profile_syncs(step, device, n, stacks)}
