"""MoE-LoRA as a registered PEFT method: `get_peft_model(model, MoeLoraConfig(...))`.

Per adapter, each targeted nn.Linear holds (all trainable, all saved)
  moelora_A     (E·r_e, n)  the E experts' A_i stacked along the rank axis
  moelora_B     (m, E·r_e)  the E experts' B_i side by side, zero-initialised
  moelora_gate  (E, n)      the gate W_g (nn.Linear(n, E, bias=False) weight)
The math lives in `flylora.layers.moelora`. Use `flylora.optim.RiemannianAdamW.from_model(model, ...)`
for the paper's per-expert Riemannian preconditioning and separate gate learning rate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ..layers.moelora import check_moe_hyperparameters, init_moelora_, moelora_delta, switch_aux_loss
from .base import AdapterConfig, AdapterLinear, AdapterTuner, register_method

MERGE_BLOCKER = (
    "MoE-LoRA's gate weights depend on each token, so Σ_i g_i(x) B_i A_i has no single ΔW to fold into W0 "
    "(only num_experts=1 merges)"
)


@dataclass
class MoeLoraConfig(AdapterConfig):
    """MoE-LoRA hyperparameters; defaults are the official Llama-3.2-3B run (E=20, r_e=4, top-k 10,
    α=16, dropout 0.05, q,k,v,o), with the paper's √g gate rescaling."""

    r: Optional[int] = field(
        default=None, metadata={"help": "total rank num_experts·expert_r; derived (leave unset)"}
    )
    lora_alpha: float = field(default=16, metadata={"help": "each expert is scaled by lora_alpha / expert_r"})
    lora_dropout: float = field(
        default=0.05, metadata={"help": "dropout on the experts' input (the gate sees the raw x)"}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "modules to adapt"}
    )
    num_experts: int = field(default=20, metadata={"help": "E, number of LoRA experts per layer"})
    expert_r: int = field(default=4, metadata={"help": "r_e, rank of each expert"})
    top_k: int = field(default=10, metadata={"help": "experts kept per token; their softmax weights are renormalised"})
    gate_rescaling: str = field(
        default="sqrt",
        metadata={"help": "'sqrt': paper Algorithm 1 (expert gradients by √g); 'none': the plain-gated baseline"},
    )
    aux_loss_coef: float = field(
        default=0.0,
        metadata={"help": "weight of the Switch load-balancing loss; 0 = off (paper). Add flylora.moe_aux_loss(model)"},
    )

    method_name = "MOELORA"

    def __post_init__(self):
        check_moe_hyperparameters(self.num_experts, self.expert_r, self.top_k, self.gate_rescaling)
        total = self.num_experts * self.expert_r
        if self.r is None:
            self.r = total
        elif self.r != total:
            raise ValueError(
                f"r={self.r!r} is not allowed: MoE-LoRA's r is num_experts·expert_r = {total}; set expert_r instead"
            )
        super().__post_init__()
        if not (isinstance(self.aux_loss_coef, (int, float)) and self.aux_loss_coef >= 0):
            raise ValueError(f"aux_loss_coef={self.aux_loss_coef!r} is not allowed: it must be a float >= 0")


class MoeLoraLayer(AdapterLinear):
    adapter_layer_names = ("moelora_A", "moelora_B", "moelora_gate")
    other_param_names = (
        "moelora_dropout", "num_experts", "expert_r", "top_k", "scaling", "gate_rescaling", "aux_loss_coef",
    )  # fmt: skip

    def _create_containers(self) -> None:
        self.moelora_A, self.moelora_B, self.moelora_gate = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.moelora_dropout = nn.ModuleDict()
        self.num_experts, self.expert_r, self.top_k, self.scaling = {}, {}, {}, {}
        self.gate_rescaling, self.aux_loss_coef = {}, {}
        # latest training forward's L_aux per adapter; plain attributes, not state (never saved)
        self.aux_losses: dict[str, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, config: MoeLoraConfig) -> None:
        E, r_e, n, m = config.num_experts, config.expert_r, self.in_features, self.out_features
        A, B, gate = torch.empty(E * r_e, n), torch.empty(m, E * r_e), torch.empty(E, n)
        init_moelora_(A, B, gate)
        self.moelora_A[adapter_name] = nn.Parameter(A)  # (E·r_e, n)
        self.moelora_B[adapter_name] = nn.Parameter(B)  # (m, E·r_e)
        self.moelora_gate[adapter_name] = nn.Parameter(gate)  # (E, n)
        self.moelora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.num_experts[adapter_name], self.expert_r[adapter_name], self.top_k[adapter_name] = E, r_e, config.top_k
        self.scaling[adapter_name] = config.lora_alpha / r_e  # official: lora_alpha / r with r the expert rank
        self.gate_rescaling[adapter_name] = config.gate_rescaling
        self.aux_loss_coef[adapter_name] = config.aux_loss_coef
        self._finish_update(adapter_name)

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        delta, probs, mask = moelora_delta(
            x, self.moelora_A[name], self.moelora_B[name], self.moelora_gate[name], self.top_k[name],
            self.scaling[name], self.gate_rescaling[name], self.moelora_dropout[name],
        )  # fmt: skip
        if self.aux_loss_coef[name] > 0 and self.training and torch.is_grad_enabled():
            self.aux_losses[name] = switch_aux_loss(probs, mask)
        return delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """With one expert g ≡ 1, so ΔW = s·B A exactly; otherwise the gate makes ΔW token-dependent."""
        if self.num_experts[adapter_name] != 1:
            raise ValueError(f"adapter {adapter_name!r} cannot be merged: {MERGE_BLOCKER}")
        B, A = self.moelora_B[adapter_name], self.moelora_A[adapter_name]
        return (B.float() @ A.float()) * self.scaling[adapter_name]  # (m, n)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.aux_losses.pop(adapter_name, None)


def moe_aux_loss(model: nn.Module, clear: bool = True) -> torch.Tensor:
    """Σ over MoE-LoRA layers and adapters of aux_loss_coef · L_aux from the latest training forward.

    Add it to the task loss before backward: ``loss = out.loss + flylora.moe_aux_loss(model)``.
    Returns a zero tensor when no layer has a loss (coefficient 0, eval mode, or no forward yet).
    `clear` drops the stored values so their graphs are freed after use.
    """
    total: Optional[torch.Tensor] = None
    for layer in model.modules():
        if not isinstance(layer, MoeLoraLayer):
            continue
        for name, value in list(layer.aux_losses.items()):
            term = layer.aux_loss_coef[name] * value
            total = term if total is None else total + term.to(total.device)
            if clear:
                del layer.aux_losses[name]
    return total if total is not None else torch.zeros(())


class MoeLoraModel(AdapterTuner):
    prefix = "moelora_"
    tuner_layer_cls = MoeLoraLayer
    layer_cls = MoeLoraLayer

    def merge_blocker(self, config: MoeLoraConfig) -> Optional[str]:
        return None if config.num_experts == 1 else MERGE_BLOCKER


register_method("moelora", MoeLoraConfig, MoeLoraModel)
