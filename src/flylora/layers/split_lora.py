"""Split-LoRA, the FlyLoRA paper's minimal MoE-LoRA baseline (Zou et al. 2025, §4.1), as pure PyTorch.

The rank-r LoRA is split into N experts of rank r/N (A_i ∈ R^{(r/N)×n}, B_i ∈ R^{m×(r/N)}) with a
router W_g ∈ R^{N×n}:

    G(x) = sigmoid(top-k(W_g x))       sigmoid of the k largest logits, 0 for the other experts
    f(x) = W0 x + (α/r) Σ_i G(x)_i B_i A_i dropout(x)

Note α/r uses the *total* rank r, as the paper writes it. The experts are computed as one rank-r
matmul pair with a (…, N) → (…, r) block mask (see `flylora.layers.moelora.expand_blocks`).
The router reads the raw x. Defaults (paper "Split-LoRA(4×8)"): N=4, r=32, k=1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .moelora import expand_blocks


def check_split_hyperparameters(r: int, num_experts: int, top_k: int) -> None:
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is not allowed: it must satisfy 1 <= top_k <= num_experts={num_experts}")
    if r % num_experts:
        raise ValueError(f"r={r} is not allowed with num_experts={num_experts}: r must be a multiple of num_experts")


def split_gate(x: torch.Tensor, router: torch.Tensor, top_k: int) -> torch.Tensor:
    """G(x) = sigmoid of the top-k router logits, zero elsewhere (selection in fp32).

    x: (..., n), router: (N, n) -> (..., N)
    """
    logits = x.to(router.dtype) @ router.t()  # (..., N)
    idx = logits.float().topk(top_k, dim=-1).indices  # (..., k)
    return torch.zeros_like(logits).scatter(-1, idx, torch.sigmoid(logits.gather(-1, idx)))


def split_lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
    scale: float,
    dropout: Optional[nn.Module] = None,
) -> torch.Tensor:
    """(α/r) Σ_i G(x)_i B_i A_i dropout(x) as B(expand(G) ⊙ A h).

    x: (..., n), A: (r, n), B: (m, r), router: (N, n) -> (..., m)
    """
    gate = split_gate(x, router, top_k)  # (..., N)
    x = x.to(A.dtype)
    h = dropout(x) if dropout is not None else x
    u = h @ A.t()  # (..., r)
    w = expand_blocks(gate.to(u.dtype), A.shape[0] // router.shape[0])  # (..., r)
    return (u * w).to(B.dtype) @ B.t() * scale


@torch.no_grad()
def init_split_lora_(A: torch.Tensor, B: torch.Tensor, router: torch.Tensor) -> None:
    """LoRA init for the experts (A kaiming-uniform(a=√5), B = 0); the router gets PyTorch's
    default nn.Linear init (the paper does not say)."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)
    nn.init.kaiming_uniform_(router, a=math.sqrt(5))


class SplitLoraLinear(nn.Module):
    """A Split-LoRA-adapted nn.Linear for use without PEFT."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 32,
        num_experts: int = 4,
        top_k: int = 1,
        alpha: float = 64.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_split_hyperparameters(r, num_experts, top_k)
        n, m = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.base, self.top_k, self.scale = base, top_k, alpha / r
        self.A = nn.Parameter(torch.empty(r, n, **kw))  # (r, n) = N blocks of r/N rows
        self.B = nn.Parameter(torch.empty(m, r, **kw))  # (m, r)
        self.router = nn.Parameter(torch.empty(num_experts, n, **kw))  # (N, n)
        init_split_lora_(self.A, self.B, self.router)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = split_lora_delta(x, self.A, self.B, self.router, self.top_k, self.scale, self.dropout)
        return self.base(x) + delta.to(x.dtype)
