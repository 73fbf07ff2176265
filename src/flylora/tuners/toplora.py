"""TopLoRA as a registered PEFT method: `get_peft_model(model, TopLoraConfig(...))`.

Per adapter, each targeted nn.Linear holds (all trainable, all saved)
  toplora_A      (r, n)   down projection
  toplora_B      (m, r)   up projection, zero-initialised
  toplora_theta  (n, r)   Θ: the token → r-vector map whose RMS-normalised exp is Σ_x
  toplora_gamma  (r,)     γ: the RMSNorm gain
The math lives in `flylora.layers.toplora`; this file is PEFT bookkeeping. Unlike the official
code, a saved adapter reloads with `PeftModel.from_pretrained`, and mixed-batch inference
(`adapter_names=`) applies Σ (the shared glue calls `adapter_delta` per row group).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ..layers.toplora import check_rms_eps, init_toplora_, toplora_delta
from .base import AdapterConfig, AdapterLinear, AdapterTuner, register_method

MERGE_BLOCKER = (
    "TopLoRA's Σ_x = diag(exp(RMSNorm(xΘ))) depends on each token, so ΔW_x = B Σ_x A has no single "
    "weight to fold into W0"
)


@dataclass
class TopLoraConfig(AdapterConfig):
    """TopLoRA hyperparameters; defaults are the official `config/toplora.yaml` (r=8, α=16, dropout 0.05, q,k,v)."""

    r: int = field(default=8, metadata={"help": "rank of A, B and the token-wise diagonal Σ_x"})
    lora_alpha: float = field(default=16, metadata={"help": "the update is scaled by lora_alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the A-branch input (Σ sees the raw x)"})
    target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"], metadata={"help": "modules to adapt"}
    )
    rms_eps: Optional[float] = field(
        default=None,
        metadata={"help": "RMSNorm epsilon; None = torch.finfo(dtype).eps (official nn.RMSNorm(eps=None))"},
    )

    method_name = "TOPLORA"

    def __post_init__(self):
        super().__post_init__()
        check_rms_eps(self.rms_eps)


class TopLoraLayer(AdapterLinear):
    adapter_layer_names = ("toplora_A", "toplora_B", "toplora_theta", "toplora_gamma")
    other_param_names = ("toplora_dropout", "r", "scaling", "rms_eps")

    def _create_containers(self) -> None:
        self.toplora_A, self.toplora_B = nn.ParameterDict(), nn.ParameterDict()
        self.toplora_theta, self.toplora_gamma = nn.ParameterDict(), nn.ParameterDict()
        self.toplora_dropout = nn.ModuleDict()
        self.r, self.scaling, self.rms_eps = {}, {}, {}

    def update_layer(self, adapter_name: str, config: TopLoraConfig) -> None:
        r, n, m = config.r, self.in_features, self.out_features
        A, B, theta, gamma = torch.empty(r, n), torch.empty(m, r), torch.empty(n, r), torch.empty(r)
        init_toplora_(A, B, theta, gamma)
        self.toplora_A[adapter_name] = nn.Parameter(A)  # (r, n)
        self.toplora_B[adapter_name] = nn.Parameter(B)  # (m, r)
        self.toplora_theta[adapter_name] = nn.Parameter(theta)  # (n, r)
        self.toplora_gamma[adapter_name] = nn.Parameter(gamma)  # (r,)
        self.toplora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.lora_alpha / r
        self.rms_eps[adapter_name] = config.rms_eps
        self._finish_update(adapter_name)

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return toplora_delta(
            x, self.toplora_A[name], self.toplora_B[name], self.toplora_theta[name], self.toplora_gamma[name],
            self.scaling[name], self.rms_eps[name], self.toplora_dropout[name],
        )  # fmt: skip

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(f"adapter {adapter_name!r} cannot be merged: {MERGE_BLOCKER}")


class TopLoraModel(AdapterTuner):
    prefix = "toplora_"
    tuner_layer_cls = TopLoraLayer
    layer_cls = TopLoraLayer

    def merge_blocker(self, config: TopLoraConfig) -> str:
        return MERGE_BLOCKER


register_method("toplora", TopLoraConfig, TopLoraModel)
