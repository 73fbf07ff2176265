"""Which tensors form a low-rank pair: found from the model's structure, never from parameter order.

Every tuner layer is asked, per adapter, for its factors. A pair is ΔW = Σ_j B_j A_j over `blocks`
independent (A_j, B_j) stacked along the rank axis, A: (blocks·r, n), B: (m, blocks·r):

  PEFT LoRA (Linear, Conv, Embedding)  one pair (lora_A, lora_B); DoRA's magnitude is a plain tensor
  PEFT AdaLoRA                         (lora_A, lora_B) = (Q, P); λ (lora_E) gets a plain step, see below
  TopLoRA                              (toplora_A, toplora_B); Θ and γ get plain steps
  MoE-LoRA                             (moelora_A, moelora_B) with blocks = E: one r_e×r_e system per expert
  Split-LoRA                           (splitlora_A, splitlora_B) with blocks = N
  HydraLoRA                            shared_A: one A (r, n), B = [B_1 … B_N] (m, N·r), see below
  FlyLoRA / LoRA-FA                    only B trains; it is preconditioned with the frozen A buffer

Routers (MoE-LoRA gate, Split-LoRA and HydraLoRA routers) form the "gate" group: never
preconditioned, optionally with their own learning rate and gradient clipping.

AdaLoRA: ΔW = P diag(λ) Q. We precondition P and Q as a LoRA pair and leave λ unpreconditioned.
Folding λ into a factor would make the r×r systems singular exactly where AdaLoRA starts (λ = 0)
and where its rank allocator prunes (λ_i = 0); its orthogonality regulariser keeps PᵀP ≈ QQᵀ ≈ I.

HydraLoRA: each head B_i pairs with the shared A, so G_{B_i} ← G_{B_i}(AAᵀ + δI)⁻¹ for every head.
For A, whose update feeds all N heads, we use the heads' mean Gram matrix:
G_A ← ((1/N) Σ_i B_iᵀB_i + δI)⁻¹ G_A. With equal heads (or N = 1) this is exactly LoRA's rule; the
router weights are token-dependent, so no per-token-exact r×r preconditioner exists.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from torch import nn

from ..tuners.flylora import FlyLoraLayer
from ..tuners.hydralora import HydraLoraLayer
from ..tuners.moelora import MoeLoraLayer
from ..tuners.split_lora import SplitLoraLayer
from ..tuners.toplora import TopLoraLayer

logger = logging.getLogger(__name__)


@dataclass(eq=False, repr=False)
class LowRankPair:
    """The factors of one adapter in one layer."""

    name: str  # "<module path>[<adapter>]", used in warnings
    B: torch.Tensor  # parameter (m, blocks·r); PEFT conv B (m, r, 1, 1) is read as (m, r)
    A: Optional[torch.Tensor] = None  # parameter (blocks·r, n), or None when A is a frozen buffer
    frozen_A: Optional[Callable[[], torch.Tensor]] = None  # fetched at step time: .to() replaces buffers
    blocks: int = 1  # independent experts stacked along the rank axis
    shared_A: bool = False  # B holds `blocks` heads that all use the one A (HydraLoRA)

    def a_value(self) -> torch.Tensor:
        return self.A if self.A is not None else self.frozen_A()

    def trainable(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.B) if t is not None and t.requires_grad]

    def shapes_fit(self) -> bool:
        A, B = self.a_value(), self.B
        rows, cols = A.shape[0], B.reshape(B.shape[0], -1).shape[1]
        if self.shared_A:
            return cols == rows * self.blocks
        return rows % self.blocks == 0 and cols == rows

    def __repr__(self) -> str:
        return f"LowRankPair({self.name}, blocks={self.blocks}{', shared A' if self.shared_A else ''})"


def _weight(entry) -> torch.Tensor:
    return entry.weight if isinstance(entry, nn.Module) else entry


def _layer_pairs(layer: nn.Module, path: str) -> Iterator[LowRankPair]:
    tag = lambda name: f"{path}[{name}]"  # noqa: E731
    if isinstance(layer, TopLoraLayer):
        for a in layer.toplora_A:
            yield LowRankPair(tag(a), layer.toplora_B[a], layer.toplora_A[a])
    elif isinstance(layer, MoeLoraLayer):
        for a in layer.moelora_A:
            yield LowRankPair(tag(a), layer.moelora_B[a], layer.moelora_A[a], blocks=layer.num_experts[a])
    elif isinstance(layer, SplitLoraLayer):
        for a in layer.splitlora_A:
            yield LowRankPair(tag(a), layer.splitlora_B[a], layer.splitlora_A[a], blocks=layer.num_experts[a])
    elif isinstance(layer, HydraLoraLayer):
        for a in layer.hydralora_A:
            yield LowRankPair(
                tag(a), layer.hydralora_B[a], layer.hydralora_A[a], blocks=layer.num_heads[a], shared_A=True
            )
    elif isinstance(layer, FlyLoraLayer):  # FlyLoRA and LoRA-FA
        for a in layer.flylora_B:
            yield LowRankPair(tag(a), layer.flylora_B[a], frozen_A=lambda layer=layer, a=a: layer.flylora_A[a])
    elif isinstance(layer, LoraLayer):  # PEFT LoRA and AdaLoRA (AdaLoraLayer subclasses LoraLayer)
        if isinstance(layer, ParamWrapper) and layer.num_experts > 1:
            # PEFT interleaves the experts of target_parameters as (out, r, experts); not our block layout
            logger.warning("%s: LoRA on stacked expert parameters gets plain (unpreconditioned) steps", path)
            return
        for A_store, B_store in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
            A_dict, B_dict = getattr(layer, A_store, {}), getattr(layer, B_store, {})
            for a in A_dict:
                if a in B_dict:
                    yield LowRankPair(tag(a), _weight(B_dict[a]), _weight(A_dict[a]))


def _layer_gates(layer: nn.Module) -> Iterator[torch.Tensor]:
    for attr in ("moelora_gate", "splitlora_router", "hydralora_router"):
        yield from getattr(layer, attr, {}).values()


def find_pairs(model: nn.Module) -> tuple[list[LowRankPair], list[torch.Tensor]]:
    """All low-rank pairs with at least one trainable factor, and all trainable router weights."""
    pairs, gates = [], []
    for path, layer in model.named_modules():
        for pair in _layer_pairs(layer, path):
            if not pair.trainable():
                continue
            if not pair.shapes_fit():
                logger.warning("%s: factor shapes do not form a low-rank pair; it gets plain steps", pair.name)
                continue
            pairs.append(pair)
        gates += [g for g in _layer_gates(layer) if g.requires_grad]
    return pairs, gates


def riemannian_param_groups(
    model: nn.Module, gate_lr: Optional[float] = None, gate_max_norm: Optional[float] = None
) -> list[dict]:
    """Parameter groups for `RiemannianSGD` / `RiemannianAdamW`, built from the model's structure.

    Group "adapter": every trainable parameter that is not a router; its "pairs" list says which
    (A, B) are preconditioned together; the rest (TopLoRA Θ/γ, AdaLoRA λ, DoRA magnitudes,
    modules_to_save, ...) get the plain step. Group "gate" (only if the model has routers): the
    routers, with `lr=gate_lr` (paper: 3e-8; None = the optimizer's lr) and `max_grad_norm=gate_max_norm`
    (paper: 1.0; None = no clipping).
    """
    pairs, gates = find_pairs(model)
    gate_ids = {id(g) for g in gates}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [{"params": params, "pairs": pairs, "role": "adapter"}]
    if gates:
        gate_group = {"params": gates, "pairs": [], "role": "gate", "max_grad_norm": gate_max_norm}
        if gate_lr is not None:
            gate_group["lr"] = gate_lr
        groups.append(gate_group)
    elif gate_lr is not None or gate_max_norm is not None:
        logger.warning("gate_lr/gate_max_norm given but the model has no trainable router; they are unused")
    logger.info(
        "riemannian_param_groups: %d preconditioned pairs, %d plain adapter tensors, %d router tensors",
        len(pairs), len(params) - sum(len(p.trainable()) for p in pairs), len(gates),
    )  # fmt: skip
    return groups
