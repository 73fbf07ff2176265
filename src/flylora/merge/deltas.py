"""Task adapters as low-rank factors, and how to pull them out of a PEFT model.

A task adapter is `dict[module_name, LowRankDelta]`; each entry stands for the weight update
ΔW = scale · B · A of one adapted linear layer (nn.Linear convention: ΔW is (out, in)).
Module names are relative to the *base* model (`model.layers.0.self_attn.q_proj` for a Llama),
which is what a PEFT adapter file puts after `base_model.model.`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

TaskAdapter = Mapping[str, "LowRankDelta"]


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = scale · B · A for one module.

    B: (m, r), A: (r, n), scale: the adapter's scaling (alpha / r for LoRA and FlyLoRA).
    Optional FlyLoRA routing state, carried along so merges that need it (the official code's
    separate averaging, a routed union) can use it; it does not enter ΔW:
      route_bias: (r,) load-balancing bias d (selects experts only), k: active rank (top-k).
    For FlyLoRA with k < r the top-k mask depends on the input, so scale · B · A is the *dense*
    delta (all r experts active) — the quantity paper Eq. 12 averages.
    """

    B: Tensor  # (m, r)
    A: Tensor  # (r, n)
    scale: float = 1.0
    route_bias: Tensor | None = None  # (r,)
    k: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.B, Tensor) or self.B.dim() != 2:
            raise ValueError(f"B must be a 2-D tensor (m, r), got {_shape_of(self.B)}")
        if not isinstance(self.A, Tensor) or self.A.dim() != 2:
            raise ValueError(f"A must be a 2-D tensor (r, n), got {_shape_of(self.A)}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"rank mismatch: B is {tuple(self.B.shape)} but A is {tuple(self.A.shape)}; need B (m, r) and A (r, n)"
            )
        if self.B.shape[1] < 1:
            raise ValueError(f"rank must be >= 1, got {self.B.shape[1]}")
        scale = float(self.scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {self.scale}")
        object.__setattr__(self, "scale", scale)
        if self.route_bias is not None and tuple(self.route_bias.shape) != (self.rank,):
            raise ValueError(f"route_bias must have shape ({self.rank},), got {tuple(self.route_bias.shape)}")
        if self.k is not None and not 1 <= int(self.k) <= self.rank:
            raise ValueError(f"k must be in [1, {self.rank}], got {self.k}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n): the shape of ΔW, i.e. of the adapted layer's weight."""
        return int(self.B.shape[0]), int(self.A.shape[1])


def _shape_of(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def work_dtype(t: Tensor) -> torch.dtype:
    """At least fp32: half-precision products lose the small cross terms merges are about."""
    return torch.promote_types(t.dtype, torch.float32)


def delta_weight(f: LowRankDelta) -> Tensor:
    """ΔW = scale · B · A, shape (m, n), in at least fp32."""
    dt = torch.promote_types(work_dtype(f.B), work_dtype(f.A))
    return f.scale * (f.B.to(dt) @ f.A.to(dt))  # (m, r) @ (r, n) -> (m, n)


def delta_weights(adapter: TaskAdapter) -> dict[str, Tensor]:
    """{module: scale · B · A} for every module of one adapter."""
    return {name: delta_weight(f) for name, f in adapter.items()}


def check_task_adapters(tasks: Sequence[TaskAdapter], *, same_rank: bool = False) -> list[str]:
    """Validate T >= 1 task adapters for merging; return the module keys (first task's order).

    Every task must adapt the same modules, with the same ΔW shape (m, n) per module; ranks may
    differ unless `same_rank` (needed when factors are averaged entry-wise).
    """
    if isinstance(tasks, Mapping) or len(tasks) == 0:
        raise ValueError("tasks must be a non-empty sequence of adapters (dict[str, LowRankDelta])")
    keys = list(tasks[0].keys())
    if not keys:
        raise ValueError("task 0 has no modules")
    ref = set(keys)
    for i, t in enumerate(tasks):
        for name, f in t.items():
            if not isinstance(f, LowRankDelta):
                raise ValueError(f"task {i} module {name!r} is a {type(f).__name__}, expected LowRankDelta")
        if set(t.keys()) != ref:
            missing = sorted(ref - set(t.keys()))[:3]
            extra = sorted(set(t.keys()) - ref)[:3]
            raise ValueError(f"task {i} modules differ from task 0: missing {missing}, extra {extra}")
    for name in keys:
        f0 = tasks[0][name]
        for i, t in enumerate(tasks[1:], start=1):
            if t[name].shape != f0.shape:
                raise ValueError(f"module {name!r}: task {i} has ΔW shape {t[name].shape}, task 0 has {f0.shape}")
            if same_rank and t[name].rank != f0.rank:
                raise ValueError(
                    f"module {name!r}: task {i} has rank {t[name].rank}, task 0 has {f0.rank}; equal ranks required"
                )
    return keys


# ---------------------------------------------------------------------------------------------
# extraction from a PEFT model


def _module_root(model: nn.Module) -> nn.Module:
    """The base model inside PEFT wrappers, so names match the adapter file's `base_model.model.<name>`."""
    if hasattr(model, "get_base_model"):  # PeftModel
        return model.get_base_model()
    try:
        from peft.tuners.tuners_utils import BaseTuner

        if isinstance(model, BaseTuner):  # LoraModel / FlyLoraModel used directly
            return model.model
    except ImportError:  # pragma: no cover - peft is a dependency, but keep the walk usable without it
        pass
    return model


def _lora_factors(name: str, layer: nn.Module, adapter_name: str) -> LowRankDelta:
    # DoRA and the other LoRA variants change the forward beyond B·A, and fan_in_fan_out layers
    # (GPT-2 Conv1D) store W transposed: a plain (B, A, scale) triple would misdescribe them.
    if adapter_name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter_name):
        raise ValueError(f"module {name!r}: LoRA variants (DoRA etc.) are not plain scale·B·A; use plain LoRA")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"module {name!r}: fan_in_fan_out layers (GPT-2 Conv1D) are not supported")
    if getattr(layer, "lora_bias", {}).get(adapter_name):
        raise ValueError(f"module {name!r}: lora_bias=True adds a bias outside B·A; not supported")
    A = layer.lora_A[adapter_name].weight.detach()  # (r, n)
    B = layer.lora_B[adapter_name].weight.detach()  # (m, r)
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"module {name!r}: only Linear LoRA layers are supported, got A {tuple(A.shape)}")
    return LowRankDelta(B=B, A=A, scale=float(layer.scaling[adapter_name]))


def _flylora_factors(layer: nn.Module, adapter_name: str) -> LowRankDelta:
    # Dense delta: for k < r FlyLoRA's top-k mask depends on the input, so scale·B·A is the
    # all-experts-active update (what paper Eq. 12 averages), not the routed function.
    bias = getattr(layer, "flylora_bias", {})
    k = getattr(layer, "k", {})
    return LowRankDelta(
        B=layer.flylora_B[adapter_name].detach(),  # (m, r)
        A=layer.flylora_A[adapter_name].detach(),  # (r, n)
        scale=float(layer.scaling[adapter_name]),
        route_bias=bias[adapter_name].detach() if adapter_name in bias else None,
        k=int(k[adapter_name]) if adapter_name in k else None,
    )


def factors_from_peft_model(model: nn.Module, adapter_name: str = "default") -> dict[str, LowRankDelta]:
    """Walk a PEFT model's tuner layers; return {module_name: LowRankDelta} for `adapter_name`.

    PEFT LoRA layers give ΔW = scaling · lora_B.weight · lora_A.weight. FlyLoRA layers (detected by
    a `flylora_B` attribute) give ΔW = scaling · flylora_B · flylora_A, the *dense* delta: with
    k < r the top-k mask is input-dependent, so this is the all-experts update paper Eq. 12 averages;
    the routing bias and k ride along in the LowRankDelta. Names are relative to the base model.
    """
    out: dict[str, LowRankDelta] = {}
    seen: set[str] = set()
    for name, layer in _module_root(model).named_modules():
        if hasattr(layer, "flylora_B"):
            seen.update(layer.flylora_B.keys())
            if adapter_name in layer.flylora_B:
                out[name] = _flylora_factors(layer, adapter_name)
        elif hasattr(layer, "lora_A") and hasattr(layer, "lora_B") and hasattr(layer, "scaling"):
            seen.update(layer.lora_A.keys())
            if adapter_name in getattr(layer, "lora_embedding_A", {}):
                raise ValueError(f"module {name!r}: embedding LoRA layers are not supported (Linear only)")
            if adapter_name in layer.lora_A:
                out[name] = _lora_factors(name, layer, adapter_name)
    if not out:
        raise ValueError(
            f"adapter {adapter_name!r} not found in any LoRA/FlyLoRA layer; adapters present: {sorted(seen)}"
        )
    return out
