"""LoRA-FA (Zhang et al. 2023, arXiv 2308.03303) as FlyLoRA's k = r, sparsity = 1 special case.

    f(x) = W0 x + (α/r) · B A x          A ∈ R^{r×n}: frozen, dense, random;  B ∈ R^{m×r}: trainable, 0-init

With every expert active FlyLoRA's top-k mask is all ones and `flylora_delta` takes its k == r
branch, which is exactly this equation; so LoRA-FA reuses that function instead of a second copy
that could drift (tests/test_baselines.py checks the two bit for bit). A is FlyLoRA's dense
N(0, 1/r²) draw from a seed, not LoRA's kaiming-uniform init used in the LoRA-FA paper.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .flylora import FlyLoraLinear, flylora_delta


def lora_fa_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, dropout: Optional[nn.Module] = None
) -> torch.Tensor:
    """(α/r) · B A dropout(x).  x: (..., n), A: (r, n), B: (m, r) -> (..., m)"""
    r = A.shape[0]
    bias = torch.zeros(r, device=A.device)  # selects nothing when k = r; FlyLoRA's signature needs it
    return flylora_delta(x, A, B, bias, r, scale, "signed", dropout)[0]


class LoraFaLinear(FlyLoraLinear):
    """A LoRA-FA-adapted nn.Linear for use without PEFT: FlyLoraLinear with k = r and a dense A."""

    def __init__(self, base: nn.Linear, r: int = 32, alpha: float = 64.0, seed: int = 0, dropout: float = 0.0):
        super().__init__(base, r=r, k=r, alpha=alpha, sparsity=1.0, bias_update_rate=0.0, seed=seed, dropout=dropout)
