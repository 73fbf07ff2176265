"""The method table run through the shared battery (tests/test_battery.py).

One row per case: which tiny model, which config, and what the method promises. Tolerances and
promises are declared here, per case, instead of `issubclass` branches inside the tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import flylora


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "mlp" or "llama"
    config_cls: type
    kwargs: dict
    trainable: tuple[str, ...]  # attribute names whose per-adapter tensors must train
    init_equals_base: bool = True  # output equals the base model right after init
    mergeable: bool = False  # merge_and_unload is exact (else it must raise)
    atol: float = 1e-5
    extra: dict = field(default_factory=dict)


MLP_TARGETS = {"target_modules": ["lin0", "lin1"]}

CASES = [
    Case("flylora-mlp-r8k2", "mlp", flylora.FlyLoraConfig, {"r": 8, "k": 2, "lora_alpha": 16, "projection_seed": 11, **MLP_TARGETS}, ("flylora_B",)),
    Case("flylora-mlp-abs", "mlp", flylora.FlyLoraConfig, {"r": 8, "k": 3, "topk_on": "abs", "projection_seed": 12, **MLP_TARGETS}, ("flylora_B",)),
    Case("flylora-mlp-sparsity", "mlp", flylora.FlyLoraConfig, {"r": 4, "k": 1, "sparsity": 0.5, "projection_seed": 13, **MLP_TARGETS}, ("flylora_B",)),
    Case("flylora-mlp-k=r", "mlp", flylora.FlyLoraConfig, {"r": 4, "k": 4, "lora_alpha": 8, "projection_seed": 14, **MLP_TARGETS}, ("flylora_B",), mergeable=True),
    Case("flylora-llama-r8k2", "llama", flylora.FlyLoraConfig, {"r": 8, "k": 2, "lora_alpha": 16, "projection_seed": 1}, ("flylora_B",)),
    Case("flylora-llama-saveA", "llama", flylora.FlyLoraConfig, {"r": 16, "k": 4, "lora_alpha": 32, "save_projection": True, "projection_seed": 2}, ("flylora_B",)),
    Case("flylora-llama-k=r", "llama", flylora.FlyLoraConfig, {"r": 4, "k": 4, "lora_alpha": 8, "sparsity": 1.0, "projection_seed": 3}, ("flylora_B",), mergeable=True),
]

# ---- sibling methods and the FlyLoRA paper's baselines ------------------------------------------
TOPLORA_T = ("toplora_A", "toplora_B", "toplora_theta", "toplora_gamma")
MOELORA_T = ("moelora_A", "moelora_B", "moelora_gate")
SPLIT_T = ("splitlora_A", "splitlora_B", "splitlora_router")
HYDRA_T = ("hydralora_A", "hydralora_B", "hydralora_router")

CASES += [
    Case("toplora-mlp", "mlp", flylora.TopLoraConfig, {"r": 4, "lora_dropout": 0.0, **MLP_TARGETS}, TOPLORA_T),
    Case("toplora-llama-eps", "llama", flylora.TopLoraConfig, {"r": 4, "rms_eps": 1e-6}, TOPLORA_T),
    Case("moelora-mlp-sqrt", "mlp", flylora.MoeLoraConfig, {"num_experts": 4, "expert_r": 2, "top_k": 2, "lora_dropout": 0.0, **MLP_TARGETS}, MOELORA_T),
    Case("moelora-mlp-E=1", "mlp", flylora.MoeLoraConfig, {"num_experts": 1, "expert_r": 4, "top_k": 1, "lora_dropout": 0.0, **MLP_TARGETS}, MOELORA_T, mergeable=True),
    Case("moelora-llama-none-aux", "llama", flylora.MoeLoraConfig, {"num_experts": 4, "expert_r": 2, "top_k": 2, "lora_alpha": 4, "gate_rescaling": "none", "aux_loss_coef": 0.01}, MOELORA_T),
    Case("splitlora-mlp", "mlp", flylora.SplitLoraConfig, {"r": 8, "num_experts": 4, "top_k": 1, **MLP_TARGETS}, SPLIT_T),
    Case("splitlora-llama-k2", "llama", flylora.SplitLoraConfig, {"r": 8, "num_experts": 4, "top_k": 2, "lora_alpha": 16}, SPLIT_T),
    Case("hydralora-mlp", "mlp", flylora.HydraLoraConfig, {"r": 4, "num_heads": 3, **MLP_TARGETS}, HYDRA_T),
    Case("hydralora-llama", "llama", flylora.HydraLoraConfig, {"r": 4, "num_heads": 2}, HYDRA_T),
    Case("lorafa-mlp", "mlp", flylora.LoraFaConfig, {"r": 4, "lora_alpha": 8, "projection_seed": 15, **MLP_TARGETS}, ("flylora_B",), mergeable=True),
    Case("lorafa-llama-saveA", "llama", flylora.LoraFaConfig, {"r": 4, "lora_alpha": 8, "save_projection": True}, ("flylora_B",), mergeable=True),
]
