"""Multi-task merges of T low-rank task adapters, computed exactly in ΔW space.

Notation: task i has ΔW_i = s_i · B_i · A_i per module (B_i (m, r_i), A_i (r_i, n)).
Every merge returns {module: merged ΔW (m, n)}; the linear ones (weight averaging, task
arithmetic) can also be written exactly as one LoRA of concatenated rank Σ r_i, and the
non-linear ones (TIES, DARE, KnOTS) can be written as a LoRA through `svd_truncate`.
Merged ΔW's are returned in at least fp32 (see `deltas.work_dtype`).
"""
from __future__ import annotations

import math
import zlib
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from flylora.merge.deltas import LowRankDelta, TaskAdapter, check_task_adapters, delta_weight

Majority = Literal["total", "count"]


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_weights(weights: Sequence[float], n_tasks: int) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != n_tasks:
        raise ValueError(f"got {len(w)} weights for {n_tasks} tasks; need one weight per task")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"weights must be finite numbers, got {w}")
    return w


def _check_density(density: float) -> float:
    d = float(density)
    if not 0.0 < d <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return d


def _check_majority(majority: str) -> None:
    if majority not in ("total", "count"):
        raise ValueError(f"majority must be 'total' or 'count', got {majority!r}")


def _dtype(fs: Sequence[LowRankDelta]) -> torch.dtype:
    """Common working dtype of several factor pairs (at least fp32)."""
    dt = torch.float32
    for f in fs:
        dt = torch.promote_types(dt, torch.promote_types(f.B.dtype, f.A.dtype))
    return dt


def _stack(tasks: Sequence[TaskAdapter], name: str, weights: Sequence[float]) -> Tensor:
    """(T, m, n) stack of w_i · ΔW_i for one module."""
    return torch.stack([w * delta_weight(t[name]) for t, w in zip(tasks, weights)])


# ---------------------------------------------------------------------------------------------
# linear merges: exact, and exactly representable as a concatenated-rank LoRA


def task_arithmetic(tasks: Sequence[TaskAdapter], weights: Sequence[float]) -> dict[str, Tensor]:
    """Task arithmetic: ΔW = Σ_i w_i · s_i · B_i · A_i (w_i may be negative: task negation)."""
    keys = check_task_adapters(tasks)
    w = _check_weights(weights, len(tasks))
    return {name: _stack(tasks, name, w).sum(0) for name in keys}


def weight_average(tasks: Sequence[TaskAdapter]) -> dict[str, Tensor]:
    """Paper Eq. 12 weight averaging: W' = W0 + (1/T) Σ_i ΔW_i; returns the ΔW part."""
    return task_arithmetic(tasks, [1.0 / len(tasks)] * len(tasks) if len(tasks) else [])


def task_arithmetic_lowrank(tasks: Sequence[TaskAdapter], weights: Sequence[float]) -> dict[str, LowRankDelta]:
    """Σ_i w_i s_i B_i A_i as one LoRA of rank Σ r_i, with scale 1:

    B_cat = [w_1 s_1 B_1 | … | w_T s_T B_T]  (m, Σr),   A_cat = [A_1; …; A_T]  (Σr, n),
    so B_cat · A_cat = Σ_i w_i s_i B_i A_i exactly (block product). Loadable with `save_peft_lora_adapter`.
    """
    keys = check_task_adapters(tasks)
    w = _check_weights(weights, len(tasks))
    out = {}
    for name in keys:
        fs = [t[name] for t in tasks]
        dt = _dtype(fs)
        B = torch.cat([wi * f.scale * f.B.to(dt) for wi, f in zip(w, fs)], dim=1)  # (m, Σr)
        A = torch.cat([f.A.to(dt) for f in fs], dim=0)  # (Σr, n)
        out[name] = LowRankDelta(B=B, A=A, scale=1.0)
    return out


def weight_average_lowrank(tasks: Sequence[TaskAdapter]) -> dict[str, LowRankDelta]:
    """Eq. 12 weight averaging as a concatenated-rank LoRA: B_cat = [s_i B_i / T], A_cat = [A_i]."""
    return task_arithmetic_lowrank(tasks, [1.0 / len(tasks)] * len(tasks) if len(tasks) else [])


# ---------------------------------------------------------------------------------------------
# the official code's merge (kept for comparison, not Eq. 12)


def legacy_separate_average(tasks: Sequence[TaskAdapter]) -> dict[str, LowRankDelta]:
    """The official FlyLoRA `merge_lora_adapters.py`: average each saved tensor separately.

    Ā = (1/T) Σ_i A_i, B̄ = (1/T) Σ_i B_i, d̄ = (1/T) Σ_i d_i (routing bias, when every task has one),
    returned as LowRankDelta(B̄, Ā, s) — the result still loads as a routed FlyLoRA adapter. Its ΔW is

        s · B̄ Ā = (s/T²) Σ_i Σ_j B_i A_j,

    which is NOT Eq. 12's (1/T) Σ_i s B_i A_i: the T² − T cross terms B_i A_j (i ≠ j) appear, and each
    task's own term is scaled by 1/T² instead of 1/T. The two agree only when all A_i are identical
    (then B̄Ā = ((1/T) Σ B_i) A) — which the shipped seed makes likely, but then the independence
    argument for FlyLoRA's low interference no longer applies. Needs equal ranks and equal scales.
    """
    keys = check_task_adapters(tasks, same_rank=True)
    out = {}
    for name in keys:
        fs = [t[name] for t in tasks]
        scales = {f.scale for f in fs}
        if len(scales) != 1:
            raise ValueError(f"module {name!r}: legacy averaging needs equal scales, got {sorted(scales)}")
        dt = _dtype(fs)
        B = torch.stack([f.B.to(dt) for f in fs]).mean(0)  # (m, r)
        A = torch.stack([f.A.to(dt) for f in fs]).mean(0)  # (r, n)
        bias = None
        if all(f.route_bias is not None for f in fs):
            bias = torch.stack([f.route_bias.to(dt) for f in fs]).mean(0)  # (r,)
        out[name] = LowRankDelta(B=B, A=A, scale=fs[0].scale, route_bias=bias, k=fs[0].k)
    return out


# ---------------------------------------------------------------------------------------------
# TIES primitives on a (T, ...) stack of task tensors


def trim_by_magnitude(stack: Tensor, density: float) -> Tensor:
    """Keep, per task, the k = max(1, ⌊density · numel⌋) entries of largest |τ_i|; zero the rest."""
    flat = stack.reshape(stack.shape[0], -1)  # (T, N)
    k = max(1, int(density * flat.shape[1]))
    if k >= flat.shape[1]:
        return stack.clone()
    idx = flat.abs().topk(k, dim=1).indices  # (T, k)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return (flat * mask).reshape(stack.shape)


def elect_sign(stack: Tensor, majority: Majority = "total") -> Tensor:
    """TIES sign election γ = sign(Σ_i τ_i) ("total": by mass) or sign(Σ_i sign(τ_i)) ("count").

    Ties (a zero sum) elect +1, as PEFT's `calculate_majority_sign_mask` does.
    """
    _check_majority(majority)
    votes = stack.sum(0) if majority == "total" else stack.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(stack.dtype)


def disjoint_mean(stack: Tensor, sign: Tensor) -> Tensor:
    """TIES disjoint mean: per entry, mean of the τ_i that are nonzero and agree with γ; 0 if none."""
    agree = (stack.sign() == sign) & (stack != 0)  # (T, ...)
    count = agree.sum(0).clamp(min=1)
    return (stack * agree).sum(0) / count


def ties_tensors(stack: Tensor, density: float, majority: Majority = "total") -> Tensor:
    """TIES (Yadav et al. 2023) on a (T, ...) stack: trim → elect sign → disjoint mean."""
    trimmed = trim_by_magnitude(stack, _check_density(density))
    return disjoint_mean(trimmed, elect_sign(trimmed, majority))


def ties(
    tasks: Sequence[TaskAdapter],
    density: float,
    majority: Majority = "total",
    weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """TIES on ΔW: τ_i = w_i ΔW_i (w_i = 1 by default), keep the top `density` fraction of |τ_i|
    per task and module, elect γ = sign(Σ τ_i) or sign(Σ sign τ_i), ΔW = mean of agreeing τ_i."""
    keys = check_task_adapters(tasks)
    w = _check_weights([1.0] * len(tasks) if weights is None else weights, len(tasks))
    _check_density(density)
    _check_majority(majority)
    return {name: ties_tensors(_stack(tasks, name, w), density, majority) for name in keys}


# ---------------------------------------------------------------------------------------------
# DARE


def _module_generator(seed: int, name: str) -> torch.Generator:
    """CPU generator seeded by (seed, module name): a module's masks do not depend on which other
    modules are merged or on dict order; crc32 because Python's str hash is salted per process."""
    module_seed = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63
    return torch.Generator(device="cpu").manual_seed(module_seed)


def dare_tensors(stack: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2024) drop-and-rescale: τ̃_i = τ_i ⊙ m_i / p, m_i ~ Bernoulli(p), p = density."""
    keep = torch.rand(stack.shape, generator=generator) < density  # drawn on CPU: same masks on any device
    return stack * keep.to(stack.device) / density


def dare(
    tasks: Sequence[TaskAdapter],
    density: float,
    seed: int,
    combine: Literal["sum", "ties"] = "sum",
    weights: Sequence[float] | None = None,
    majority: Majority = "total",
) -> dict[str, Tensor]:
    """DARE on ΔW: τ̃_i = (w_i ΔW_i) ⊙ m_i / p with m_i ~ Bernoulli(p = density) from a seeded CPU
    generator, then ΔW = Σ_i τ̃_i ("sum", PEFT's dare_linear) or TIES sign election + disjoint mean
    without trimming ("ties", PEFT's dare_ties). Same seed → same masks."""
    keys = check_task_adapters(tasks)
    w = _check_weights([1.0] * len(tasks) if weights is None else weights, len(tasks))
    p = _check_density(density)
    if combine not in ("sum", "ties"):
        raise ValueError(f"combine must be 'sum' or 'ties', got {combine!r}")
    _check_majority(majority)
    out = {}
    for name in keys:
        dropped = dare_tensors(_stack(tasks, name, w), p, _module_generator(seed, name))  # (T, m, n)
        out[name] = dropped.sum(0) if combine == "sum" else disjoint_mean(dropped, elect_sign(dropped, majority))
    return out


# ---------------------------------------------------------------------------------------------
# KnOTS


def _knots_module(
    fs: Sequence[LowRankDelta], merge: str, density: float, majority: Majority
) -> tuple[Tensor, Tensor]:
    """Return (basis·Σ (m, K), V̄ (K, n)) with ΔW_merged = basis Σ V̄ for one module.

    [ΔW_1 | … | ΔW_T] = [s_1B_1 | … | s_TB_T] · blockdiag(A_1, …, A_T) = Q R blockdiag(A) and
    R blockdiag(A) = U Σ Vᵀ, so the joint SVD is (QU) Σ Vᵀ without forming the (m, T·n) matrix.
    """
    dt = _dtype(fs)
    n = fs[0].shape[1]
    B_cat = torch.cat([f.scale * f.B.to(dt) for f in fs], dim=1)  # (m, R), R = Σ r_i
    Q, Rf = torch.linalg.qr(B_cat)  # (m, R'), (R', R), R' = min(m, R)
    blocks, start = [], 0
    for f in fs:
        blocks.append(Rf[:, start : start + f.rank] @ f.A.to(dt))  # (R', n)
        start += f.rank
    U, S, Vh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)  # (R',K) (K,) (K, T·n)
    # keep the numerical rank only: coefficients of zero-energy directions are rounding noise,
    # which TIES would otherwise trim and vote on as if it were signal
    tol = S.max() * max(Q.shape[0], Vh.shape[1]) * torch.finfo(dt).eps
    K = max(1, int((S > tol).sum()))
    basis = (Q @ U[:, :K]) * S[:K]  # (m, K): shared orthonormal basis times singular values
    V = Vh[:K].reshape(K, len(fs), n).transpose(0, 1)  # (T, K, n): ΔW_i = basis · V_i
    V_bar = V.mean(0) if merge == "mean" else ties_tensors(V, density, majority)  # (K, n)
    return basis, V_bar


def _knots_check(tasks: Sequence[TaskAdapter], merge: str, density: float, majority: str) -> list[str]:
    keys = check_task_adapters(tasks)
    if merge not in ("ties", "mean"):
        raise ValueError(f"merge must be 'ties' or 'mean', got {merge!r}")
    _check_density(density)
    _check_majority(majority)
    return keys


def knots(
    tasks: Sequence[TaskAdapter],
    merge: Literal["ties", "mean"] = "ties",
    density: float = 1.0,
    majority: Majority = "total",
) -> dict[str, Tensor]:
    """KnOTS (Stoica et al. 2025): align the tasks in a shared basis, then merge coefficients.

    Joint SVD [ΔW_1 | … | ΔW_T] = U Σ [V_1 | … | V_T] (U (m, K), V_i (K, n)), so ΔW_i = U Σ V_i;
    merge the V_i entry-wise (TIES with `density`/`majority`, or the mean) into V̄ and return
    ΔW = U Σ V̄. With merge="mean" this equals Eq. 12 exactly; with T = 1 and density = 1 it
    reproduces the input.
    """
    keys = _knots_check(tasks, merge, density, majority)
    out = {}
    for name in keys:
        basis, V_bar = _knots_module([t[name] for t in tasks], merge, density, majority)
        out[name] = basis @ V_bar  # (m, n)
    return out


def knots_lowrank(
    tasks: Sequence[TaskAdapter],
    merge: Literal["ties", "mean"] = "ties",
    density: float = 1.0,
    majority: Majority = "total",
) -> dict[str, LowRankDelta]:
    """`knots` written exactly as a LoRA: B = U Σ (m, K), A = V̄ (K, n), scale 1, K ≤ Σ r_i."""
    keys = _knots_check(tasks, merge, density, majority)
    out = {}
    for name in keys:
        basis, V_bar = _knots_module([t[name] for t in tasks], merge, density, majority)
        out[name] = LowRankDelta(B=basis, A=V_bar, scale=1.0)
    return out


# ---------------------------------------------------------------------------------------------
# writing a full-rank merge as a LoRA


def svd_truncate(
    deltas: Mapping[str, Tensor], rank: int | Mapping[str, int]
) -> tuple[dict[str, LowRankDelta], dict[str, float]]:
    """Best rank-r approximation (Eckart–Young) of each merged ΔW, as a scale-1 LoRA.

    ΔW = U S Vᵀ, B = U[:, :r] S[:r] (m, r), A = Vᵀ[:r] (r, n); r is clamped to min(m, n).
    Also returns the relative error ‖ΔW − B A‖_F / ‖ΔW‖_F per module (0 for ΔW = 0).
    """
    factors, errors = {}, {}
    for name, dw in deltas.items():
        r = rank[name] if isinstance(rank, Mapping) else rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"module {name!r}: rank must be an int >= 1, got {r!r}")
        if dw.dim() != 2:
            raise ValueError(f"module {name!r}: ΔW must be 2-D (m, n), got shape {tuple(dw.shape)}")
        dw = dw.to(torch.promote_types(dw.dtype, torch.float32))
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)  # (m, q) (q,) (q, n)
        r = min(r, S.numel())
        B, A = U[:, :r] * S[:r], Vh[:r]
        factors[name] = LowRankDelta(B=B, A=A, scale=1.0)
        norm = torch.linalg.matrix_norm(dw)
        errors[name] = float(torch.linalg.matrix_norm(dw - B @ A) / norm) if norm > 0 else 0.0
    return factors, errors
