"""Loss-free load balancing across a whole model: the once-per-optimizer-step bias update,
routing statistics, and the HF Trainer callback that calls the update."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from .layers.routing import load_entropy, loss_free_bias_update
from .tuners.flylora import FlyLoraLayer


def routed_layers(model: nn.Module) -> list[tuple[str, FlyLoraLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FlyLoraLayer)]


@torch.no_grad()
def update_routing_bias(model: nn.Module) -> int:
    """Apply d_i += u·sign(mean(c) − c_i) to every FlyLoRA adapter with counts since the last call,
    then reset the counts. Call once per optimizer step (RoutingBiasCallback does).

    Under torch.distributed the counts of all ranks are summed first (one all-reduce per device),
    so every rank applies the same update and d stays identical everywhere. Returns the number of
    (layer, adapter) biases updated.
    """
    entries = [(layer, name, c) for _, layer in routed_layers(model) for name, c in layer.pending_counts.items()]
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        by_device: dict[torch.device, list] = {}
        for e in entries:
            by_device.setdefault(e[2].device, []).append(e)
        for group in by_device.values():
            flat = torch.cat([c for _, _, c in group])
            dist.all_reduce(flat)
            for (_, _, c), part in zip(group, flat.split([c.numel() for _, _, c in group])):
                c.copy_(part)
    for layer, name, counts in entries:
        if layer.flylora_bias[name].dtype != torch.float32:  # e.g. after model.to(torch.bfloat16)
            layer.flylora_bias[name] = layer.flylora_bias[name].float()
        loss_free_bias_update(layer.flylora_bias[name], counts, layer.bias_update_rate[name])
        FlyLoraLayer._sink(layer.load_totals, name, counts.numel(), counts.device).add_(counts)
        counts.zero_()
        layer._forwards_since_update = 0
    return len(entries)


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
    """Updates FlyLoRA routing biases once per optimizer step inside a transformers Trainer."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            update_routing_bias(model)
