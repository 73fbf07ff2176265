"""Riemannian preconditioned optimizers for low-rank adapters (Zhang & Pilanci 2024; Sun et al. 2025).

    opt = flylora.optim.RiemannianAdamW.from_model(model, lr=1e-5, gate_lr=3e-8, gate_max_norm=1.0)

Pairs (A, B) are found from the model's tuner layers (PEFT LoRA/AdaLoRA, FlyLoRA, LoRA-FA, TopLoRA,
MoE-LoRA per expert, Split-LoRA per expert, HydraLoRA), never from parameter order.
"""
from .pairs import LowRankPair, find_pairs, riemannian_param_groups
from .precondition import precondition_a, precondition_b
from .riemannian import RiemannianAdamW, RiemannianSGD

__all__ = [
    "LowRankPair", "RiemannianAdamW", "RiemannianSGD", "find_pairs", "precondition_a", "precondition_b",
    "riemannian_param_groups",
]  # fmt: skip
