"""Interference analysis between task adapters (FlyLoRA paper §3.2–3.4, Table 16).

- pairwise cosine of vec(ΔW_i), vec(ΔW_j) per module (Corollary 3.5: ≈ 0 for independent A's);
- ‖A_i A_jᵀ‖ (Frobenius, spectral) against Theorem 3.4's prediction for sparse Gaussian A;
- linear CKA between hidden outputs (Table 16);
- the JL distance ratio ‖Ax − Ay‖² / (r σ² ‖x − y‖²) of Theorem 3.1.
Everything ending in `_summary` returns plain JSON-serialisable dicts (NaN → None).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from flylora.merge.deltas import TaskAdapter, check_task_adapters


def _json_float(x: float | Tensor) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _names(task_names: Sequence[str] | None, n_tasks: int) -> list[str]:
    names = [f"task{i}" for i in range(n_tasks)] if task_names is None else list(task_names)
    if len(names) != n_tasks:
        raise ValueError(f"got {len(names)} task names for {n_tasks} tasks")
    return names


# ---------------------------------------------------------------------------------------------
# cosines of ΔW's


def pairwise_cosines(tasks: Sequence[TaskAdapter]) -> dict[str, Tensor]:
    """Per module, the (T, T) matrix cos(vec ΔW_i, vec ΔW_j), computed from the factors:

    ⟨ΔW_i, ΔW_j⟩_F = s_i s_j tr(A_iᵀ B_iᵀ B_j A_j) = s_i s_j Σ_ab (B_iᵀB_j)_ab (A_iA_jᵀ)_ab,
    which costs O((m + n) r²) instead of forming m × n matrices. NaN where a ΔW is zero.
    """
    keys = check_task_adapters(tasks)
    out = {}
    for name in keys:
        fs = [t[name] for t in tasks]
        T = len(fs)
        dev = fs[0].B.device
        Bs = [f.scale * f.B.double().to(dev) for f in fs]  # (m, r_i), scale folded in
        As = [f.A.double().to(dev) for f in fs]  # (r_i, n)
        gram = torch.empty(T, T, dtype=torch.float64)
        for i in range(T):
            for j in range(i, T):
                inner = ((Bs[i].T @ Bs[j]) * (As[i] @ As[j].T)).sum()  # (r_i, r_j) ⊙ (r_i, r_j)
                gram[i, j] = gram[j, i] = inner.cpu()
        norms = gram.diagonal().clamp(min=0).sqrt()
        out[name] = gram / (norms[:, None] * norms[None, :])  # 0/0 -> NaN for zero ΔW
    return out


def mean_cosine_matrix(cosines: Mapping[str, Tensor], absolute: bool = False) -> Tensor:
    """(T, T) mean over modules of the cosine matrices (of |cos| if `absolute`), ignoring NaNs."""
    if not cosines:
        raise ValueError("cosines is empty")
    stack = torch.stack([c.abs() if absolute else c for c in cosines.values()])  # (M, T, T)
    return stack.nanmean(0)


def cosine_summary(tasks: Sequence[TaskAdapter], task_names: Sequence[str] | None = None) -> dict:
    """JSON: per-module cosine matrices, their mean, and the mean off-diagonal cos and |cos|."""
    names = _names(task_names, len(tasks))
    cos = pairwise_cosines(tasks)
    T = len(tasks)
    off = ~torch.eye(T, dtype=torch.bool)
    all_off = torch.cat([c[off] for c in cos.values()]) if T > 1 else torch.empty(0, dtype=torch.float64)
    return {
        "tasks": names,
        "per_module": {k: [[_json_float(x) for x in row] for row in c.tolist()] for k, c in cos.items()},
        "mean_matrix": [[_json_float(x) for x in row] for row in mean_cosine_matrix(cos).tolist()],
        "mean_offdiag_cos": _json_float(all_off.nanmean()) if all_off.numel() else None,
        "mean_offdiag_abs_cos": _json_float(all_off.abs().nanmean()) if all_off.numel() else None,
    }


# ---------------------------------------------------------------------------------------------
# ‖A_i A_jᵀ‖ and Theorem 3.4


def row_nonzeros(A: Tensor) -> float:
    """p estimate: mean number of nonzeros per row of A (r, n); = n for a dense A."""
    return float((A != 0).sum(1).double().mean())


def cross_projection_norms(A_i: Tensor, A_j: Tensor) -> dict[str, float]:
    """‖A_i A_jᵀ‖_F and ‖A_i A_jᵀ‖_2 for A_i (r_i, n), A_j (r_j, n)."""
    if A_i.dim() != 2 or A_j.dim() != 2 or A_i.shape[1] != A_j.shape[1]:
        raise ValueError(f"A_i {tuple(A_i.shape)} and A_j {tuple(A_j.shape)} must be (r, n) with the same n")
    C = A_i.double() @ A_j.double().to(A_i.device).T  # (r_i, r_j)
    return {
        "frobenius": float(torch.linalg.matrix_norm(C, "fro")),
        "spectral": float(torch.linalg.matrix_norm(C, 2)),
    }


def predicted_cross_entry_var(n: int, r: int, p: float) -> float:
    """Theorem 3.4: Var((A_iA_jᵀ)_ml) = n σ⁴ = p² / (n r⁴), σ² = p/(n r²) (nonzeros ~ N(0, 1/r²))."""
    return p * p / (n * r**4)


def predicted_cross_frobenius(
    n: int, r: int, p: float, r_j: int | None = None, p_j: float | None = None
) -> float:
    """sqrt(E‖A_iA_jᵀ‖_F²) = sqrt(r_i r_j · p_i p_j / (n r_i² r_j²)); for equal r, p: sqrt(r² p²/(n r⁴)) = p/(r√n).

    Independent FlyLoRA A's (p nonzeros per row, values N(0, 1/r²)); E[A_iA_jᵀ] = 0 (Theorem 3.4).
    """
    r_j = r if r_j is None else r_j
    p_j = p if p_j is None else p_j
    for label, v in (("n", n), ("r", r), ("r_j", r_j), ("p", p), ("p_j", p_j)):
        if not v > 0:
            raise ValueError(f"{label} must be > 0, got {v}")
    return math.sqrt(p * p_j / (n * r * r_j))  # r_i r_j entries, each of variance p_i p_j / (n r_i² r_j²)


def cross_projection_summary(tasks: Sequence[TaskAdapter], task_names: Sequence[str] | None = None) -> dict:
    """JSON: per module and task pair i < j, ‖A_iA_jᵀ‖_F, ‖A_iA_jᵀ‖_2, the Theorem 3.4 prediction
    (p estimated from A's nonzeros per row) and measured/predicted. The prediction assumes nonzeros
    ~ N(0, 1/r²) (FlyLoRA init); for other A's (e.g. LoRA's Kaiming init) read it as a yardstick."""
    names = _names(task_names, len(tasks))
    keys = check_task_adapters(tasks)
    per_module: dict[str, list] = {}
    ratios = []
    for key in keys:
        fs = [t[key] for t in tasks]
        n = fs[0].shape[1]
        rows = []
        for i in range(len(fs)):
            for j in range(i + 1, len(fs)):
                meas = cross_projection_norms(fs[i].A, fs[j].A)
                pi, pj = row_nonzeros(fs[i].A), row_nonzeros(fs[j].A)
                pred = float("nan")
                if pi > 0 and pj > 0:  # an all-zero A has no prediction
                    pred = predicted_cross_frobenius(n, fs[i].rank, pi, fs[j].rank, pj)
                ratio = meas["frobenius"] / pred if pred > 0 else float("nan")
                ratios.append(ratio)
                rows.append({
                    "pair": [names[i], names[j]],
                    "frobenius": meas["frobenius"],
                    "spectral": meas["spectral"],
                    "p": [pi, pj],
                    "predicted_frobenius": _json_float(pred),
                    "ratio_to_prediction": _json_float(ratio),
                })
        per_module[key] = rows
    finite = [x for x in ratios if math.isfinite(x)]
    return {
        "tasks": names,
        "per_module": per_module,
        "mean_ratio_to_prediction": sum(finite) / len(finite) if finite else None,
    }


# ---------------------------------------------------------------------------------------------
# CKA and JL


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of X (N, d1), Y (N, d2), rows = the same N tokens:

    with column-centred X̃, Ỹ:  CKA = ‖Ỹᵀ X̃‖_F² / (‖X̃ᵀ X̃‖_F · ‖Ỹᵀ Ỹ‖_F).
    Invariant to orthogonal transforms and isotropic scaling of either side; CKA(X, X) = 1.
    """
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X {tuple(X.shape)} and Y {tuple(Y.shape)} must be (N, d) with the same N tokens")
    if X.shape[0] < 2:
        raise ValueError(f"need at least 2 tokens for centring, got {X.shape[0]}")
    X = X.double()
    Y = Y.double().to(X.device)
    X = X - X.mean(0, keepdim=True)
    Y = Y - Y.mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(Y.T @ X) ** 2  # (d2, d1)
    denom = torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y)
    if denom == 0:
        raise ValueError("CKA undefined: X or Y is constant across tokens")
    return float(cross / denom)


def jl_distance_ratios(A: Tensor, X: Tensor, Y: Tensor, p: float | None = None) -> Tensor:
    """Theorem 3.1 ratios ‖A x − A y‖² / (r σ² ‖x − y‖²), σ² = p/(n r²), for row pairs (x, y) of
    X, Y (N, n). p defaults to A's mean nonzeros per row. ≈ 1 when A preserves distances."""
    if A.dim() != 2 or X.dim() != 2 or X.shape != Y.shape or X.shape[1] != A.shape[1]:
        raise ValueError(
            f"need A (r, n) and X, Y (N, n) of equal shape; got A {tuple(A.shape)}, X {tuple(X.shape)}, Y {tuple(Y.shape)}"
        )
    r, n = A.shape
    p = row_nonzeros(A) if p is None else float(p)
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    sigma2 = p / (n * r * r)
    diff = (X.double() - Y.double().to(X.device)).to(A.device)  # (N, n)
    dist2 = diff.pow(2).sum(1)
    if (dist2 == 0).any():
        raise ValueError("some pairs have x == y; the distance ratio is undefined")
    proj2 = (diff @ A.double().T).pow(2).sum(1)  # (N,)
    return proj2 / (r * sigma2 * dist2)


def jl_summary(ratios: Tensor) -> dict:
    """JSON: mean/std/min/max of JL distance ratios and their count."""
    ratios = ratios.double().flatten()
    if ratios.numel() == 0:
        raise ValueError("ratios is empty")
    return {
        "n_pairs": int(ratios.numel()),
        "mean": float(ratios.mean()),
        "std": float(ratios.std()) if ratios.numel() > 1 else 0.0,
        "min": float(ratios.min()),
        "max": float(ratios.max()),
    }
