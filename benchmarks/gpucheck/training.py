"""Sections 2 and 3: training steps on a ~1B Llama (bf16 weights, bf16 autocast, non-reentrant
gradient checkpointing), FlyLoRA r32/k8 vs PEFT LoRA r8 / r32 vs the frozen base, and the same on
a 4-bit (NF4, bitsandbytes) base; the routing-bias update's share of a step; host-sync detection.

A step is forward + backward + AdamW step (+ `update_routing_bias` for FlyLoRA). The frozen base
has nothing to train: its step back-propagates to the (detached, requires_grad) input embeddings,
the floor every adapter pays anyway (as in `flylora bench`). Methods run one after another, each
on a weight-sharing copy of the same base, built, warmed up, timed and freed in turn, so the
peak memory of one method never includes another's optimizer state.

Timing: every step (and, inside FlyLoRA's, the bias update) is a span between two CUDA events;
the host never waits between steps, so a hidden host sync would show up as lost throughput and is
looked for separately (see `syncs`). Per-step medians are reported; tokens/s = batch·seq / median.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .common import Budget, Device, Timer, attempt, build_llama, median, peft_copy, ratio, token_batch
from .syncs import detect_syncs

METHODS = ("frozen_base", "flylora_r32k8", "lora_r8", "lora_r32")
FLY, FLOOR = "flylora_r32k8", "frozen_base"


class Stepper:
    def __init__(self, model, method: str, batch: dict, device: Device, seed: int):
        self.model, self.method, self.batch, self.device = model, method, batch, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if method != FLOOR else None
        self.routed = method == FLY
        self.bias_timer = Timer(device)
        self.bias_host_s: list[float] = []

    def step(self) -> None:
        from flylora.balance import update_routing_bias
        from flylora.bench.cases import adapter_step  # the step `flylora bench` times, on this device

        adapter_step(self.model, self.batch, self.opt, self.device.autocast(torch.bfloat16))
        if self.routed:
            t = time.perf_counter()
            with self.bias_timer.span():
                update_routing_bias(self.model)
            self.bias_host_s.append(time.perf_counter() - t)


def _prepare(model) -> None:
    model.train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def measure_method(base, method: str, sizes, device: Device, seed: int, syncs: bool = True) -> dict:
    batch = token_batch(base.config.vocab_size, *sizes.train_batch, device)
    model = peft_copy(base, method, seed)
    _prepare(model)
    s = Stepper(model, method, batch, device, seed)
    for _ in range(sizes.warmup):
        s.step()
    device.sync()
    s.bias_timer, s.bias_host_s = Timer(device), []
    device.reset_peak()
    static = device.allocated()
    timer = Timer(device)
    t0 = time.perf_counter()
    for _ in range(sizes.steps):
        with timer.span():
            s.step()
    secs = timer.seconds()  # synchronizes once
    wall = time.perf_counter() - t0
    peak = device.peak()
    step = median(secs)
    tokens = sizes.train_batch[0] * sizes.train_batch[1]
    res = {
        "step_s_median": step, "step_s_min": min(secs), "step_s_max": max(secs), "steps": len(secs),
        "wall_s_for_steps": wall, "tokens_per_s": tokens / step,
        "peak_bytes": peak, "static_bytes": static,
        "step_increment_bytes": peak - static if peak is not None else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }  # fmt: skip
    if s.routed:
        bias = s.bias_timer.seconds()
        res["bias_update"] = {
            "device_s_median": median(bias), "host_s_median": median(s.bias_host_s),
            "share_of_step": median(bias) / step, "host_share_of_step": median(s.bias_host_s) / step,
        }  # fmt: skip
    if syncs:  # attributed (slow Python stacks) for FlyLoRA and its closest control, counted for the rest
        res["syncs"] = detect_syncs(s.step, device, sizes.sync_steps, stacks=method in (FLY, "lora_r8"))
    del s, model
    device.free()
    return res


def run_training(sizes, device: Device, budget: Budget, log, quantized: bool = False) -> dict:
    label = "training_4bit" if quantized else "training_bf16"
    out: dict = {"model": sizes.train_model.describe(), "batch": list(sizes.train_batch),
                 "precision": "bf16 weights, bf16 autocast, non-reentrant gradient checkpointing",
                 "steps": sizes.steps, "warmup": sizes.warmup, "methods": {}}  # fmt: skip
    if quantized:
        reason = bnb_unavailable(device)
        if reason:
            out["skipped"] = reason
            log(f"{label}: skipped: {reason}")
            return out
        out["precision"] = "NF4 4-bit base (bitsandbytes Linear4bit, bf16 compute), " + out["precision"]
    base = build_llama(sizes.train_model, device, torch.bfloat16)
    if quantized:
        quantize_4bit(base, device)
    out["base_params"] = sum(p.numel() for p in base.parameters())
    need = 10.0
    for i, method in enumerate(METHODS):
        if not budget.allows(f"{label}/{method}", need):
            continue
        t = time.perf_counter()
        res = attempt(out, f"{label}/{method}",
                      lambda: measure_method(base, method, sizes, device, seed=30 + i, syncs=not quantized), device, log)
        need = 1.3 * (time.perf_counter() - t)  # the next method costs about as much as this one
        if res is None:
            continue
        out["methods"][method] = res
        log(f"{label} {method}: {res['step_s_median'] * 1e3:.1f} ms/step, {res['tokens_per_s']:.0f} tok/s"
            + (f", peak {res['peak_bytes'] / 2**30:.2f} GiB" if res["peak_bytes"] else ""))
    out["ratios"] = training_ratios(out["methods"])
    del base
    device.free()
    return out


def training_ratios(m: dict) -> dict:
    def step(k):
        return m.get(k, {}).get("step_s_median")

    def peak(k):
        return m.get(k, {}).get("peak_bytes")

    return {
        "step_flylora_vs_lora_r8": ratio(step(FLY), step("lora_r8")),
        "step_flylora_vs_lora_r32": ratio(step(FLY), step("lora_r32")),
        "step_flylora_vs_frozen_base": ratio(step(FLY), step(FLOOR)),
        "step_lora_r8_vs_frozen_base": ratio(step("lora_r8"), step(FLOOR)),
        "peak_memory_flylora_vs_lora_r8": ratio(peak(FLY), peak("lora_r8")),
        "peak_memory_flylora_vs_lora_r32": ratio(peak(FLY), peak("lora_r32")),
    }


# ---------------------------------------------------------------- 4-bit base


def bnb_unavailable(device: Device) -> Optional[str]:
    """None when a bitsandbytes NF4 Linear4bit runs forward and backward on `device`, else why not."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or its native library fails to load
        return f"bitsandbytes not importable: {type(e).__name__}: {e}"
    try:
        lin = torch.nn.Linear(64, 64, bias=False)
        q = _linear4bit(bnb, lin, device)
        x = torch.randn(2, 64, device=device.torch, dtype=torch.bfloat16, requires_grad=True)
        q(x).float().sum().backward()
        device.sync()
    except Exception as e:
        return f"bitsandbytes {bnb.__version__} has no working 4-bit kernels on {device.type}: {type(e).__name__}: {e}"
    return None


def _linear4bit(bnb, lin: torch.nn.Linear, device: Device):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")  # fmt: skip
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
    return q.to(device.torch)  # Params4bit quantizes on .to(device)


def quantize_4bit(model, device: Device) -> None:
    """Every nn.Linear of the decoder layers becomes an NF4 Linear4bit (the LM head stays bf16, as
    transformers' BitsAndBytesConfig does)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if type(mod) is torch.nn.Linear:
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                setattr(parent, name.rpartition(".")[2], _linear4bit(bnb, mod, device))
    model.requires_grad_(False)
    device.free()
