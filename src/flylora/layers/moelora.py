"""MoE-LoRA with gate rescaling (Sun et al., ICML 2025, arXiv 2502.15828), the layer as pure PyTorch.

E experts E_i(x) = s · B_i A_i dropout(x) of rank r_e (A_i ∈ R^{r_e×n}, B_i ∈ R^{m×r_e}, s = α/r_e),
a gate W_g ∈ R^{E×n} on the raw x:

    p    = softmax(W_g x)                       over all E experts
    M    = 0/1 mask of the top-k entries of p
    g    = p ⊙ M / Σ_j p_j M_j                  renormalised over the chosen k
    h    = W0 x + Σ_i y_i

gate_rescaling="none" (the baseline):   y_i = g_i · E_i(x)
gate_rescaling="sqrt" (paper Algorithm 1, official "moe-riemannian"):

    y_i = sg(√g_i) · E_i(x) + (g_i − sg(√g_i)) · sg(E_i(x))          sg = stop-gradient

The forward value is unchanged (y_i = g_i E_i(x)). For the gradients, per token, with
G = ∂L/∂h:
    ∂L/∂E_i(x) = √g_i · G       (baseline: g_i · G), i.e. every gradient that flows through
                                  expert i — to A_i, B_i and, via that path, to x — is the
                                  baseline's multiplied by 1/√g_i (0 for unselected experts);
    ∂L/∂g_i    = E_i(x)ᵀ G       exactly the baseline's, so the gate and its path to x are unchanged.
√g is detached, so the square root is never differentiated at g_i = 0.

All experts are computed as ONE rank E·r_e matmul pair: A = [A_1; …; A_E] ∈ R^{E·r_e×n},
B = [B_1 … B_E] ∈ R^{m×E·r_e}, and the (…, E) gate weights are expanded to a (…, E·r_e) block mask:
Σ_i g_i B_i A_i h = B (expand(g) ⊙ A h). Computation is dense over experts, as in the official code.

Optional Switch-Transformer load-balancing loss (off by default, as in the paper):
    L_aux = E · Σ_i f_i P_i,   f_i = share of the tokens' top-k slots given to expert i,
                               P_i = mean over tokens of p_i (differentiable through the gate).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

GATE_RESCALING = ("sqrt", "none")


def check_moe_hyperparameters(num_experts: int, expert_r: int, top_k: int, gate_rescaling: str) -> None:
    for name, value in (("num_experts", num_experts), ("expert_r", expert_r), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is not allowed: it must satisfy 1 <= top_k <= num_experts={num_experts}")
    if gate_rescaling not in GATE_RESCALING:
        raise ValueError(f"gate_rescaling={gate_rescaling!r} is not allowed; use one of {list(GATE_RESCALING)}")


def expand_blocks(w: torch.Tensor, rank: int) -> torch.Tensor:
    """Per-expert weights to a per-rank block mask: (..., E) -> (..., E·rank)."""
    return w.repeat_interleave(rank, dim=-1)


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Renormalised top-k gate weights g, the full softmax p and the 0/1 top-k mask M.

    The softmax and the selection run in fp32 so that bf16 rounding does not reorder close experts.
    x: (..., n), gate_weight: (E, n) -> g, p, M: (..., E) fp32
    """
    logits = x.to(gate_weight.dtype) @ gate_weight.t()  # (..., E)
    probs = logits.float().softmax(dim=-1)  # (..., E)
    mask = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)  # (..., E)
    kept = probs * mask
    return kept / kept.sum(dim=-1, keepdim=True), probs, mask


def combine_experts(
    u: torch.Tensor, g: torch.Tensor, B: torch.Tensor, scale: float, gate_rescaling: str
) -> torch.Tensor:
    """Σ_i y_i from u = A h (all experts' rank-r_e activations) and the gate weights g.

    u: (..., E·r_e), g: (..., E), B: (m, E·r_e) -> (..., m)
    """
    r_e = B.shape[1] // g.shape[-1]
    g = g.to(u.dtype)
    if gate_rescaling == "none" or not torch.is_grad_enabled():
        return (u * expand_blocks(g, r_e)).to(B.dtype) @ B.t() * scale
    # Algorithm 1 in block form. sg(√g)·E(x) keeps the expert path (u and B) with weight √g;
    # (g − sg(√g))·sg(E(x)) carries the gate's gradient with E(x) constant. Two B matmuls; A's is shared.
    c = g.detach().sqrt()
    expert_path = (u * expand_blocks(c, r_e)).to(B.dtype) @ B.t()
    gate_path = (u.detach() * expand_blocks(g - c, r_e)).to(B.dtype) @ B.detach().t()
    return (expert_path + gate_path) * scale


def moelora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gate_weight: torch.Tensor,
    top_k: int,
    scale: float,
    gate_rescaling: str = "sqrt",
    dropout: Optional[nn.Module] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_i y_i, plus the softmax p and top-k mask M (for the auxiliary loss and routing statistics).

    x: (..., n), A: (E·r_e, n), B: (m, E·r_e), gate_weight: (E, n) -> (..., m), (..., E), (..., E)
    """
    g, probs, mask = route(x, gate_weight, top_k)  # the gate reads the raw x
    x = x.to(A.dtype)
    h = dropout(x) if dropout is not None else x
    u = h @ A.t()  # (..., E·r_e): every expert's A_i h in one matmul
    return combine_experts(u, g, B, scale, gate_rescaling), probs, mask


def switch_aux_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_aux = E · Σ_i f_i P_i (Switch Transformer); 1 when perfectly balanced.

    probs, mask: (..., E) -> scalar fp32
    """
    E = probs.shape[-1]
    slots = mask.detach().reshape(-1, E).float()  # (tokens, E)
    f = slots.sum(0) / slots.sum()  # (E,), share of the top-k slots
    P = probs.reshape(-1, E).float().mean(0)  # (E,)
    return E * (f * P).sum()


@torch.no_grad()
def init_moelora_(A: torch.Tensor, B: torch.Tensor, gate_weight: torch.Tensor) -> None:
    """Official init: every A_i kaiming-uniform(a=√5) = U(±1/√n) (fan_in is n for the stacked A too),
    B = 0, and the gate keeps PyTorch's default nn.Linear init (also kaiming-uniform(a=√5))."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)
    nn.init.kaiming_uniform_(gate_weight, a=math.sqrt(5))


class MoeLoraLinear(nn.Module):
    """An MoE-LoRA-adapted nn.Linear for use without PEFT. In training, ``last_aux_loss`` holds the
    Switch load-balancing loss of the latest forward (add ``coef · last_aux_loss`` to your loss)."""

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int = 20,
        expert_r: int = 4,
        top_k: int = 10,
        alpha: float = 16.0,
        dropout: float = 0.0,
        gate_rescaling: str = "sqrt",
    ):
        super().__init__()
        check_moe_hyperparameters(num_experts, expert_r, top_k, gate_rescaling)
        n, m, R = base.in_features, base.out_features, num_experts * expert_r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.base, self.top_k, self.scale, self.gate_rescaling = base, top_k, alpha / expert_r, gate_rescaling
        self.A = nn.Parameter(torch.empty(R, n, **kw))  # (E·r_e, n)
        self.B = nn.Parameter(torch.empty(m, R, **kw))  # (m, E·r_e)
        self.gate = nn.Parameter(torch.empty(num_experts, n, **kw))  # (E, n)
        init_moelora_(self.A, self.B, self.gate)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.last_aux_loss: Optional[torch.Tensor] = None
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta, probs, mask = moelora_delta(
            x, self.A, self.B, self.gate, self.top_k, self.scale, self.gate_rescaling, self.dropout
        )
        self.last_aux_loss = switch_aux_loss(probs, mask) if self.training else None
        return self.base(x) + delta.to(x.dtype)
