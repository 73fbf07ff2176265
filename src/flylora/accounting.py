"""Parameter accounting for every adapter method, PEFT's own included, on any device (meta too).

    counts = flylora.count_parameters(peft_model)

trainable   parameters with requires_grad (what an optimizer updates; 0 for an adapter loaded for inference)
activated   trainable parameters one token uses: the FlyLoRA paper's "Param%" (its Table 1/9).
            Per adapted linear W0 ∈ R^{m×n}:
              LoRA, AdaLoRA (at its initial rank)   r(n+m)  (+ r for AdaLoRA's λ)
              FlyLoRA                               k·m            (the k columns of B a token picks;
                                                                    A is frozen and not counted)
              LoRA-FA                               r·m            (FlyLoRA with k = r)
              TopLoRA                               r(2n+m+1)      (A, B, Θ, γ: all used by every token)
              MoE-LoRA                              top_k·r_e(n+m) + E·n    (chosen experts + the gate)
              Split-LoRA                            k·(r/N)(n+m) + N·n      (chosen experts + the router)
              HydraLoRA                             r·n + N·r·m + N·n       (dense softmax: every head)
            Anything else trainable (modules_to_save, DoRA magnitudes, other PEFT methods) counts fully.
stored      numel of the tensors the adapter checkpoint holds, summed over adapters (PEFT's
            get_peft_model_state_dict, i.e. exactly what save_pretrained writes: e.g. FlyLoRA's B and
            routing bias, plus its sparse A only with save_projection=True)
total       all parameters of the model, adapters included (buffers such as FlyLoRA's frozen A are not
            parameters and are not counted)
base        the base model's parameters (total minus adapter tensors and modules_to_save copies)
*_pct       100 · count / base
by_tensor   trainable count per adapter attribute ("lora_A", "moelora_gate", ...; "other" for the rest)
"""
from __future__ import annotations

from fractions import Fraction

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .tuners.flylora import FlyLoraLayer
from .tuners.moelora import MoeLoraLayer
from .tuners.split_lora import SplitLoraLayer

BASE_CHILDREN = {"base_layer", "original_module"}


def _activated_fractions(layer: nn.Module, adapter: str) -> dict[str, Fraction]:
    """Share of each routed tensor that one token uses; tensors not listed are used in full."""
    if isinstance(layer, FlyLoraLayer):  # and LoRA-FA, where k = r
        return {"flylora_B": Fraction(layer.k[adapter], layer.r[adapter])}
    if isinstance(layer, MoeLoraLayer):
        f = Fraction(layer.top_k[adapter], layer.num_experts[adapter])
        return {"moelora_A": f, "moelora_B": f}
    if isinstance(layer, SplitLoraLayer):
        f = Fraction(layer.top_k[adapter], layer.num_experts[adapter])
        return {"splitlora_A": f, "splitlora_B": f}
    return {}


def _entries(container) -> list[tuple[str, list[nn.Parameter]]]:
    """(adapter name, its parameters) of one per-adapter container (ParameterDict or ModuleDict)."""
    if isinstance(container, nn.ParameterDict):
        return [(name, [p]) for name, p in container.items()]
    if isinstance(container, nn.ModuleDict):
        return [(name, list(m.parameters())) for name, m in container.items()]
    return []


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters that belong to adapters: inside a tuner layer or auxiliary wrapper, not its base."""
    wrappers = {path for path, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))}
    ids = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        inside = any(".".join(parts[:i]) in wrappers for i in range(len(parts)))
        if inside and not BASE_CHILDREN.intersection(parts):
            ids.add(id(p))
    return ids


def _stored(model: nn.Module) -> int:
    if isinstance(model, PeftModel):
        # save_embedding_layers=False: "auto" may look up the base model on the Hub; we count adapters
        return sum(
            t.numel()
            for name in model.peft_config
            for t in get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False).values()
        )
    # a bare model with injected tuner layers: their persistent adapter state
    total = 0
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            total += sum(
                t.numel() for k, t in layer.state_dict().items() if not BASE_CHILDREN.intersection(k.split("."))
            )
    return total


def count_parameters(model: nn.Module) -> dict:
    """Trainable, activated-per-token, stored and total parameter counts (see the module docstring)."""
    params = list(model.parameters())  # deduplicated (tied weights count once)
    total = sum(p.numel() for p in params)
    adapter_ids = _adapter_parameter_ids(model)
    base = total - sum(p.numel() for p in params if id(p) in adapter_ids)
    trainable = sum(p.numel() for p in params if p.requires_grad)

    activated, by_tensor, seen = Fraction(0), {}, set()
    for layer in model.modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        for attr in layer.adapter_layer_names:
            for adapter, tensors in _entries(getattr(layer, attr, None)):
                share = _activated_fractions(layer, adapter).get(attr, Fraction(1))
                for p in tensors:
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        activated += p.numel() * share
                        by_tensor[attr] = by_tensor.get(attr, 0) + p.numel()
    rest = sum(p.numel() for p in params if p.requires_grad and id(p) not in seen)
    activated += rest
    if rest:
        by_tensor["other"] = rest
    if activated.denominator != 1:
        raise AssertionError(f"activated parameter count {activated} is not an integer; a routing rule is wrong")

    stored = _stored(model)
    pct = lambda n: 100.0 * n / base if base else float("nan")  # noqa: E731
    return {
        "trainable": trainable,
        "activated": int(activated),
        "stored": stored,
        "total": total,
        "base": base,
        "trainable_pct": pct(trainable),
        "activated_pct": pct(int(activated)),
        "stored_pct": pct(stored),
        "by_tensor": by_tensor,
    }
