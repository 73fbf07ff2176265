"""The Riemannian preconditioner of Zhang & Pilanci (ICML 2024, arXiv 2402.02347), per block.

For ΔW = B A with A ∈ R^{r×n}, B ∈ R^{m×r}:

    G̃_A = (BᵀB + δI_r)⁻¹ G_A          G̃_B = G_B (AAᵀ + δI_r)⁻¹

applied independently to each of the `blocks` experts stacked along the rank axis
(A_j = A[j·r:(j+1)·r], B_j = B[:, j·r:(j+1)·r]). With shared_A (HydraLoRA) B holds `blocks` heads that
all pair with the one A: G_{B_j} uses AAᵀ, and G_A uses the heads' mean Gram (1/N) Σ_j B_jᵀB_j.

The r×r systems are solved with torch.linalg.solve in fp32 (never an explicit inverse). A block
whose solve fails (singular, e.g. δ = 0 with B = 0) or gives non-finite values falls back to its
unpreconditioned gradient; the returned per-block flags say where, so the optimizer can log it.
"""
from __future__ import annotations

import torch


def _solve(M: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X = M⁻¹ G per block, or G where that fails. M: (E|1, r, r), G: (E, r, k) -> X (E, r, k), ok (E,)"""
    X, info = torch.linalg.solve_ex(M, G)
    ok = (info == 0) & torch.isfinite(X).flatten(1).all(dim=1)  # (E,)
    return torch.where(ok[:, None, None], X, G), ok


def _eye(r: int, delta: float, like: torch.Tensor) -> torch.Tensor:
    return delta * torch.eye(r, dtype=torch.float32, device=like.device)


def precondition_a(
    grad_A: torch.Tensor, B: torch.Tensor, blocks: int = 1, shared_A: bool = False, delta: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """G̃_A = (B_jᵀB_j + δI)⁻¹ G_{A_j} per block, in fp32.

    grad_A: (blocks·r, n…) (or (r, n…) with shared_A), B: (m, blocks·r…) -> (fp32 like grad_A, ok (blocks,))
    """
    G = grad_A.reshape(grad_A.shape[0], -1).float()  # (E·r, n)
    B2 = B.detach().reshape(B.shape[0], -1).float()  # (m, E·r) or (m, N·r)
    m, n = B2.shape[0], G.shape[1]
    E = 1 if shared_A else blocks
    r = G.shape[0] // E
    Bb = B2.view(m, blocks, r).transpose(0, 1)  # (blocks, m, r)
    gram = Bb.transpose(1, 2) @ Bb  # (blocks, r, r)
    if shared_A:
        gram = gram.mean(dim=0, keepdim=True)  # (1, r, r): the heads' mean Gram
    X, ok = _solve(gram + _eye(r, delta, G), G.view(E, r, n))  # (E, r, n)
    return X.reshape(grad_A.shape), ok


def precondition_b(
    grad_B: torch.Tensor, A: torch.Tensor, blocks: int = 1, shared_A: bool = False, delta: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """G̃_B = G_{B_j} (A_jA_jᵀ + δI)⁻¹ per block (every head uses the one A with shared_A), in fp32.

    Since the Gram matrix is symmetric, G M⁻¹ = (M⁻¹ Gᵀ)ᵀ, which is what is solved.
    grad_B: (m, blocks·r…), A: (blocks·r, n…) or (r, n…) -> (fp32 like grad_B, ok (blocks,))
    """
    G = grad_B.reshape(grad_B.shape[0], -1).float()  # (m, blocks·r)
    A2 = A.detach().reshape(A.shape[0], -1).float()  # (E·r, n)
    m, n = G.shape[0], A2.shape[1]
    E = 1 if shared_A else blocks
    r = A2.shape[0] // E
    Ab = A2.view(E, r, n)
    gram = Ab @ Ab.transpose(1, 2)  # (E, r, r), broadcast over the heads when E = 1
    Gt = G.view(m, blocks, r).permute(1, 2, 0)  # (blocks, r, m)
    X, ok = _solve(gram + _eye(r, delta, G), Gt)  # (blocks, r, m)
    return X.permute(2, 0, 1).reshape(grad_B.shape), ok
