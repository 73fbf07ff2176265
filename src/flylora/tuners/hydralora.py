"""HydraLoRA as a registered PEFT method: `get_peft_model(model, HydraLoraConfig(...))`.

Per adapter, each targeted nn.Linear holds (all trainable, all saved)
  hydralora_A       (r, n)    the shared A
  hydralora_B       (m, N·r)  the N heads B_i side by side, zero-initialised
  hydralora_router  (N, n)    W_r
The math lives in `flylora.layers.hydralora`; this file is PEFT bookkeeping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..layers.hydralora import check_hydra_hyperparameters, hydralora_delta, init_hydralora_
from .base import AdapterConfig, AdapterLinear, AdapterTuner, register_method

MERGE_BLOCKER = (
    "HydraLoRA's router weights softmax(W_r x) depend on each token, so Σ_i ω_i(x) B_i A has no single ΔW "
    "to fold into W0 (only num_heads=1 merges)"
)


@dataclass
class HydraLoraConfig(AdapterConfig):
    """HydraLoRA hyperparameters; defaults are the FlyLoRA paper's "HydraLoRA(r=8, A=1, B=3)":
    one shared A of rank 8, N=3 heads, α=16 (= 2r), dropout 0, all 7 projections."""

    r: int = field(default=8, metadata={"help": "rank of the shared A and of every head"})
    lora_alpha: float = field(default=16, metadata={"help": "the update is scaled by lora_alpha / r"})
    num_heads: int = field(default=3, metadata={"help": "N, number of B heads sharing one A"})

    method_name = "HYDRALORA"

    def __post_init__(self):
        super().__post_init__()
        check_hydra_hyperparameters(self.num_heads)


class HydraLoraLayer(AdapterLinear):
    adapter_layer_names = ("hydralora_A", "hydralora_B", "hydralora_router")
    other_param_names = ("hydralora_dropout", "r", "num_heads", "scaling")

    def _create_containers(self) -> None:
        self.hydralora_A, self.hydralora_B = nn.ParameterDict(), nn.ParameterDict()
        self.hydralora_router = nn.ParameterDict()
        self.hydralora_dropout = nn.ModuleDict()
        self.r, self.num_heads, self.scaling = {}, {}, {}

    def update_layer(self, adapter_name: str, config: HydraLoraConfig) -> None:
        r, N, n, m = config.r, config.num_heads, self.in_features, self.out_features
        A, B, router = torch.empty(r, n), torch.empty(m, N * r), torch.empty(N, n)
        init_hydralora_(A, B, router)
        self.hydralora_A[adapter_name] = nn.Parameter(A)  # (r, n)
        self.hydralora_B[adapter_name] = nn.Parameter(B)  # (m, N·r)
        self.hydralora_router[adapter_name] = nn.Parameter(router)  # (N, n)
        self.hydralora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.r[adapter_name], self.num_heads[adapter_name] = r, N
        self.scaling[adapter_name] = config.lora_alpha / r
        self._finish_update(adapter_name)

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return hydralora_delta(
            x, self.hydralora_A[name], self.hydralora_B[name], self.hydralora_router[name], self.scaling[name],
            self.hydralora_dropout[name],
        )  # fmt: skip

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """With one head ω ≡ 1, so ΔW = (α/r)·B A exactly."""
        if self.num_heads[adapter_name] != 1:
            raise ValueError(f"adapter {adapter_name!r} cannot be merged: {MERGE_BLOCKER}")
        B, A = self.hydralora_B[adapter_name], self.hydralora_A[adapter_name]
        return (B.float() @ A.float()) * self.scaling[adapter_name]  # (m, n)


class HydraLoraModel(AdapterTuner):
    prefix = "hydralora_"
    tuner_layer_cls = HydraLoraLayer
    layer_cls = HydraLoraLayer

    def merge_blocker(self, config: HydraLoraConfig) -> Optional[str]:
        return None if config.num_heads == 1 else MERGE_BLOCKER


register_method("hydralora", HydraLoraConfig, HydraLoraModel)
