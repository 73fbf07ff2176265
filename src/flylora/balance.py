"""Loss-free load balancing across a whole model: the bias update, routing statistics, and the
HF Trainer callback that calls the update.

Cadence (`FlyLoraConfig.bias_update_every`): "step" adapters are updated by `update_routing_bias`
(RoutingBiasCallback calls it once per optimizer step); "micro_batch" adapters update themselves
after the backward of every training micro-batch (`layers.routing.AfterBackward`, armed by the
FlyLoRA tuner in each training forward), the official code's cadence without its bugs."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from .layers.routing import BIAS_CADENCES, load_entropy
from .tuners.flylora import FlyLoraLayer


def routed_layers(model: nn.Module) -> list[tuple[str, FlyLoraLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FlyLoraLayer)]


@torch.no_grad()
def update_routing_bias(model: nn.Module, cadence: str | None = None) -> int:
    """Apply d_i += u·sign(mean(c) − c_i) to every FlyLoRA adapter with counts since the last call,
    then reset the counts. Call once per optimizer step (RoutingBiasCallback does). `cadence`
    ("step" or "micro_batch") limits the update to adapters with that `bias_update_every`; None
    updates all (a "micro_batch" adapter has no counts left by then, so it is unchanged).

    Under torch.distributed the counts of all ranks are summed first (one all-reduce per device),
    so every rank applies the same update and d stays identical everywhere. Returns the number of
    (layer, adapter) biases updated.

    Cost: this runs once per step over every adapted layer (210 in SmolLM2-135M), so it is
    batched: per (device, r) group one stack of the counts, one sign/mean, and `_foreach` adds,
    a dozen tensor ops in all instead of ~8 per layer (SmolLM2, one CPU thread: 9.2 ms -> 3.3 ms
    right after a backward, 1 ms warm; `flylora bench` reports its share of a step). The counts
    are exact integers, so the batched mean and sign are bit-identical to
    `layers.routing.loss_free_bias_update` applied layer by layer.
    """
    if cadence is not None and cadence not in BIAS_CADENCES:
        raise ValueError(f"cadence={cadence!r} is not allowed; use one of {list(BIAS_CADENCES)} or None")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    entries = [
        (layer, name, c)
        for layer in _layers_to_update(model, distributed, cadence)
        for name, c in layer.pending_counts.items()
        if cadence is None or layer.bias_update_every.get(name, "step") == cadence
    ]
    if distributed:
        by_device: dict[torch.device, list] = {}
        for e in entries:
            by_device.setdefault(e[2].device, []).append(e)
        for group in by_device.values():
            flat = torch.cat([c for _, _, c in group])
            dist.all_reduce(flat)
            for (_, _, c), part in zip(group, flat.split([c.numel() for _, _, c in group])):
                c.copy_(part)
    groups: dict[tuple, tuple[list, list, list, list]] = {}
    for layer, name, counts in entries:
        store = layer.flylora_bias
        bias = store[name]
        if bias.dtype != torch.float32:  # e.g. after model.to(torch.bfloat16)
            bias = store[name] = bias.float()
        total = layer.load_totals.get(name)
        if total is None or total.device != counts.device:
            total = layer.load_totals[name] = torch.zeros(counts.numel(), device=counts.device)
        layer.__dict__["_forwards_since_update"] = 0  # a plain int: skip nn.Module.__setattr__
        rate = float(layer.bias_update_rate[name])
        # the rate is part of the key so that each group scales by one Python float: a tensor built
        # from host data (torch.tensor(rates, device="cuda")) is a blocking copy, a host sync per step
        b, c, t, u = groups.setdefault((counts.device, counts.numel(), counts.dtype, rate), ([], [], [], []))
        b.append(bias), c.append(counts), t.append(total), u.append(rate)
    for biases, counts, totals, rates in groups.values():
        stacked = torch.stack(counts)  # (layers, r)
        step = torch.sign(stacked.mean(dim=1, keepdim=True) - stacked)  # (layers, r), as loss_free_bias_update
        step.mul_(rates[0])  # one rate per group (it is in the key)
        torch._foreach_add_(biases, list(step.to(torch.float32).unbind(0)))
        torch._foreach_add_(totals, counts)
        torch._foreach_zero_(counts)
    return len(entries)


def _layers_to_update(model: nn.Module, distributed: bool, cadence: str | None = None) -> list[FlyLoraLayer]:
    """The FlyLoRA layers that may hold counts. A FlyLoRA PEFT model's layers register in their
    shared routing context when they count, which saves walking all ~2000 modules of a 30-layer
    model every step (2-4 ms on CPU). Layers that did not count hold zero counts, for which the
    update changes nothing. Under torch.distributed every rank must all-reduce the same tensors
    in the same order, so there (and for models with no context to ask) every layer is visited.
    With a `cadence`, layers that also hold adapters of the other cadence stay registered."""
    ctx = None
    for m in (model, getattr(model, "base_model", None)):
        ctx = getattr(m, "_routing_context", None) if m is not None else None
        if ctx is not None and hasattr(ctx, "pending_layers"):
            break
        ctx = None
    if ctx is None or distributed:
        if ctx is not None:
            _unregister(ctx.pending_layers, list(ctx.pending_layers.values()), cadence)
        # modules(), not named_modules(): no name strings to build
        return [m for m in model.modules() if isinstance(m, FlyLoraLayer)]
    layers = list(ctx.pending_layers.values())
    _unregister(ctx.pending_layers, layers, cadence)
    return layers


def _unregister(pending: dict, layers: list[FlyLoraLayer], cadence: str | None) -> None:
    if cadence is None:
        pending.clear()
        return
    for layer in layers:
        if all(c == cadence for c in layer.bias_update_every.values()):
            pending.pop(id(layer), None)


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[None]:
    """Also record expert loads in eval / no-grad forwards (e.g. to see how a task routes).
    Recording never changes the routing bias."""
    layers = [m for _, m in routed_layers(model)]
    for m in layers:
        m.recording = True
    try:
        yield
    finally:
        for m in layers:
            m.recording = False


def routing_stats(model: nn.Module, reset: bool = False) -> dict[str, dict]:
    """Per layer and adapter: expert load fractions, their entropy (nats) and its maximum log r,
    the number of routed tokens, and the current bias. Loads are those applied in bias updates
    plus any recorded under `record_routing`."""
    out = {}
    for lname, layer in routed_layers(model):
        for name in layer.flylora_B:
            total = layer.load_totals.get(name)
            r, k = layer.r[name], layer.k[name]
            load = total.detach().float().cpu() if total is not None else torch.zeros(r)
            frac, h = load_entropy(load)
            out[f"{lname}[{name}]"] = {
                "layer": lname,
                "adapter": name,
                "load": [round(v, 6) for v in frac.tolist()],
                "entropy": h,
                "max_entropy": math.log(r),
                "tokens": int(round(float(load.sum()) / k)),
                "bias": layer.flylora_bias[name].detach().float().cpu().tolist(),
            }
            if reset and total is not None:
                total.zero_()
    return out


class RoutingBiasCallback(TrainerCallback):
    """Updates the routing biases of `bias_update_every="step"` FlyLoRA adapters once per optimizer
    step inside a transformers Trainer ("micro_batch" adapters update themselves)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            update_routing_bias(model, cadence="step")
