"""Split-LoRA as a registered PEFT method: `get_peft_model(model, SplitLoraConfig(...))`.

Per adapter, each targeted nn.Linear holds (all trainable, all saved)
  splitlora_A       (r, n)  N experts' A_i (r/N rows each) stacked along the rank axis
  splitlora_B       (m, r)  N experts' B_i side by side, zero-initialised
  splitlora_router  (N, n)  W_g
The math lives in `flylora.layers.split_lora`; this file is PEFT bookkeeping.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers.split_lora import check_split_hyperparameters, init_split_lora_, split_lora_delta
from .base import AdapterConfig, AdapterLinear, AdapterTuner, register_method

MERGE_BLOCKER = (
    "Split-LoRA's router weights sigmoid(top-k(W_g x)) depend on each token, so Σ_i G(x)_i B_i A_i has no "
    "single ΔW to fold into W0"
)


@dataclass
class SplitLoraConfig(AdapterConfig):
    """Split-LoRA hyperparameters; defaults are the FlyLoRA paper's "Split-LoRA(4×8)": total rank
    r=32 in N=4 experts of rank 8, k=1 active, α=64 (= 2r, as FlyLoRA), dropout 0, all 7 projections."""

    r: int = field(default=32, metadata={"help": "total rank, split into num_experts experts of rank r/num_experts"})
    lora_alpha: float = field(default=64, metadata={"help": "the update is scaled by lora_alpha / r (total r)"})
    num_experts: int = field(default=4, metadata={"help": "N, number of experts; must divide r"})
    top_k: int = field(default=1, metadata={"help": "experts activated per token"})

    method_name = "SPLITLORA"

    def __post_init__(self):
        super().__post_init__()
        check_split_hyperparameters(self.r, self.num_experts, self.top_k)


class SplitLoraLayer(AdapterLinear):
    adapter_layer_names = ("splitlora_A", "splitlora_B", "splitlora_router")
    other_param_names = ("splitlora_dropout", "r", "num_experts", "top_k", "scaling")

    def _create_containers(self) -> None:
        self.splitlora_A, self.splitlora_B = nn.ParameterDict(), nn.ParameterDict()
        self.splitlora_router = nn.ParameterDict()
        self.splitlora_dropout = nn.ModuleDict()
        self.r, self.num_experts, self.top_k, self.scaling = {}, {}, {}, {}

    def update_layer(self, adapter_name: str, config: SplitLoraConfig) -> None:
        r, N, n, m = config.r, config.num_experts, self.in_features, self.out_features
        A, B, router = torch.empty(r, n), torch.empty(m, r), torch.empty(N, n)
        init_split_lora_(A, B, router)
        self.splitlora_A[adapter_name] = nn.Parameter(A)  # (r, n)
        self.splitlora_B[adapter_name] = nn.Parameter(B)  # (m, r)
        self.splitlora_router[adapter_name] = nn.Parameter(router)  # (N, n)
        self.splitlora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.r[adapter_name], self.num_experts[adapter_name], self.top_k[adapter_name] = r, N, config.top_k
        self.scaling[adapter_name] = config.lora_alpha / r
        self._finish_update(adapter_name)

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return split_lora_delta(
            x, self.splitlora_A[name], self.splitlora_B[name], self.splitlora_router[name], self.top_k[name],
            self.scaling[name], self.splitlora_dropout[name],
        )  # fmt: skip

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(f"adapter {adapter_name!r} cannot be merged: {MERGE_BLOCKER}")


class SplitLoraModel(AdapterTuner):
    prefix = "splitlora_"
    tuner_layer_cls = SplitLoraLayer
    layer_cls = SplitLoraLayer

    def merge_blocker(self, config: SplitLoraConfig) -> str:
        return MERGE_BLOCKER


register_method("splitlora", SplitLoraConfig, SplitLoraModel)
