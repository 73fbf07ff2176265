"""HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245), a FlyLoRA-paper baseline, as pure PyTorch.

One shared A ∈ R^{r×n}, N heads B_i ∈ R^{m×r} and a router W_r ∈ R^{N×n}:

    ω(x) = softmax(W_r x)                                   over all N heads (dense, no top-k)
    f(x) = W0 x + (α/r) Σ_i ω_i(x) B_i A dropout(x)

The heads are stored side by side, B = [B_1 … B_N] ∈ R^{m×N·r}, so the sum is one matmul:
Σ_i ω_i B_i u = B (ω ⊗ u) with u = A h and (ω ⊗ u) ∈ R^{N·r}. The router reads the raw x.
Defaults (FlyLoRA paper App. B.2, "HydraLoRA(r=8, A=1, B=3)"): N=3, r=8. With N=1, ω ≡ 1 and the
layer is plain LoRA, which is the only case that merges.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def check_hydra_hyperparameters(num_heads: int) -> None:
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"num_heads={num_heads!r} is not allowed: it must be a positive integer")


def hydra_router(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """ω(x) = softmax(W_r x) in fp32. x: (..., n), router: (N, n) -> (..., N)"""
    return (x.to(router.dtype) @ router.t()).float().softmax(dim=-1)


def hydralora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    router: torch.Tensor,
    scale: float,
    dropout: Optional[nn.Module] = None,
) -> torch.Tensor:
    """(α/r) Σ_i ω_i(x) B_i A dropout(x).

    x: (..., n), A: (r, n), B: (m, N·r), router: (N, n) -> (..., m)
    """
    w = hydra_router(x, router)  # (..., N)
    x = x.to(A.dtype)
    h = dropout(x) if dropout is not None else x
    u = h @ A.t()  # (..., r), shared by every head
    z = (w.to(u.dtype).unsqueeze(-1) * u.unsqueeze(-2)).flatten(-2)  # (..., N·r), head-major like B
    return z.to(B.dtype) @ B.t() * scale


@torch.no_grad()
def init_hydralora_(A: torch.Tensor, B: torch.Tensor, router: torch.Tensor) -> None:
    """A kaiming-uniform(a=√5), every head B_i = 0, router PyTorch's default nn.Linear init."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)
    nn.init.kaiming_uniform_(router, a=math.sqrt(5))


class HydraLoraLinear(nn.Module):
    """A HydraLoRA-adapted nn.Linear for use without PEFT."""

    def __init__(self, base: nn.Linear, r: int = 8, num_heads: int = 3, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        check_hydra_hyperparameters(num_heads)
        n, m = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.base, self.scale = base, alpha / r
        self.A = nn.Parameter(torch.empty(r, n, **kw))  # (r, n), shared
        self.B = nn.Parameter(torch.empty(m, num_heads * r, **kw))  # (m, N·r), head i = B[:, i·r:(i+1)·r]
        self.router = nn.Parameter(torch.empty(num_heads, n, **kw))  # (N, n)
        init_hydralora_(self.A, self.B, self.router)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = hydralora_delta(x, self.A, self.B, self.router, self.scale, self.dropout)
        return self.base(x) + delta.to(x.dtype)
