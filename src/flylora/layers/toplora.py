"""TopLoRA (Li et al., NeurIPS 2025, arXiv 2510.23123), the layer as pure PyTorch.

    λ(x) = exp( γ ⊙ u / sqrt(mean_j u_j² + ε) ),   u = x Θ          Θ ∈ R^{n×r}, γ ∈ R^r
    h    = W0 x + (α/r) · B( (A · dropout(x)) ⊙ λ(x) )               A ∈ R^{r×n}, B ∈ R^{m×r}

i.e. ΔW_x = (α/r)·B Σ_x A with the token-dependent diagonal Σ_x = diag(λ(x)) > 0. Σ is computed
from the raw x; only the A branch sees dropout (as the official `mypeft/toplora.py`).

Init (official): A kaiming-uniform(a=√5) = U(±1/√n), B = 0 (so the layer starts at W0), Θ ~ U(±1/√n)
(kaiming-uniform(a=√5, mode="fan_out") of an (n, r) tensor), γ = 1. ε = None means
``torch.finfo(dtype).eps`` of the computation dtype, which is what ``nn.RMSNorm(eps=None)`` does.

Σ depends on the token, so there is no single ΔW: the layer cannot be merged into W0.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def token_scales(
    x: torch.Tensor, theta: torch.Tensor, gamma: torch.Tensor, eps: Optional[float] = None
) -> torch.Tensor:
    """λ(x) = exp(RMSNorm_r(x Θ; γ, ε)), strictly positive.

    x: (..., n), theta: (n, r), gamma: (r,) -> (..., r)
    """
    u = x.to(theta.dtype) @ theta  # (..., r)
    return torch.exp(F.rms_norm(u, (u.shape[-1],), gamma.to(u.dtype), eps))


def toplora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    theta: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    eps: Optional[float] = None,
    dropout: Optional[nn.Module] = None,
) -> torch.Tensor:
    """(α/r) · B((A · dropout(x)) ⊙ λ(x)).

    x: (..., n), A: (r, n), B: (m, r), theta: (n, r), gamma: (r,) -> (..., m)
    """
    x = x.to(A.dtype)  # the official layer casts the input to the adapter dtype first
    h = dropout(x) if dropout is not None else x
    lam = token_scales(x, theta, gamma, eps)  # (..., r), from the raw x
    return ((h @ A.t()) * lam.to(A.dtype)).to(B.dtype) @ B.t() * scale  # (..., m)


@torch.no_grad()
def init_toplora_(A: torch.Tensor, B: torch.Tensor, theta: torch.Tensor, gamma: torch.Tensor) -> None:
    """Official init: A ~ U(±1/√n) (kaiming a=√5), B = 0, Θ (n, r) ~ U(±1/√n), γ = 1."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)
    nn.init.kaiming_uniform_(theta, a=math.sqrt(5), mode="fan_out")  # fan_out = size(0) = n
    nn.init.ones_(gamma)


def check_rms_eps(rms_eps: Optional[float]) -> None:
    is_number = isinstance(rms_eps, (int, float)) and not isinstance(rms_eps, bool)
    if rms_eps is not None and not (is_number and rms_eps > 0):
        raise ValueError(f"rms_eps={rms_eps!r} is not allowed: use None (torch.finfo(dtype).eps) or a float > 0")


class TopLoraLinear(nn.Module):
    """A TopLoRA-adapted nn.Linear for use without PEFT (the PEFT method in ``flylora.tuners`` is
    the same computation with PEFT's multi-adapter semantics)."""

    def __init__(
        self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, rms_eps: Optional[float] = None
    ):
        super().__init__()
        check_rms_eps(rms_eps)
        n, m = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.base, self.scale, self.rms_eps = base, alpha / r, rms_eps
        self.A = nn.Parameter(torch.empty(r, n, **kw))  # (r, n)
        self.B = nn.Parameter(torch.empty(m, r, **kw))  # (m, r)
        self.theta = nn.Parameter(torch.empty(n, r, **kw))  # (n, r)
        self.gamma = nn.Parameter(torch.empty(r, **kw))  # (r,)
        init_toplora_(self.A, self.B, self.theta, self.gamma)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = toplora_delta(x, self.A, self.B, self.theta, self.gamma, self.scale, self.rms_eps, self.dropout)
        return self.base(x) + delta.to(x.dtype)
