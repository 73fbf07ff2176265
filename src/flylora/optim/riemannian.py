"""Riemannian preconditioned SGD and AdamW for low-rank adapters.

Per pair (see `pairs.py`) and per expert block (see `precondition.py`):

    G̃_A = (BᵀB + δI)⁻¹ G_A,    G̃_B = G_B (AAᵀ + δI)⁻¹

RiemannianSGD:    p ← p − η·wd·p − η·G̃                         (decoupled weight decay)
RiemannianAdamW:  m ← β1 m + (1−β1) G̃,  v ← β2 v + (1−β2) G̃²
                  p ← p − η_t · m / (√v + eps),  then  p ← p − η·wd·p
                  η_t = η, or η·√(1−β2ᵗ)/(1−β1ᵗ) with correct_bias=True (official default: False)

`precondition_b_with`: "current_a" (default) builds B's preconditioner from A_t, the pre-update A, so
both factors see the same point; "updated_a" uses A_{t+1}, which is what the official AdamWr of
both reference repos does (A is updated in place before B's preconditioner is formed).

Tensors outside any pair (TopLoRA Θ/γ, routers, DoRA magnitudes, modules_to_save) get the same
update with G̃ = G. Groups may set `max_grad_norm` (gradient clipping of that group, as the paper
does for the MoE gate) and their own `lr`. Adam moments are kept in fp32.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer

from .pairs import LowRankPair, riemannian_param_groups
from .precondition import precondition_a, precondition_b

logger = logging.getLogger(__name__)

PRECONDITION_B_WITH = ("current_a", "updated_a")


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


class _RiemannianOptimizer(Optimizer):
    def __init__(self, params: Union[Iterable, list[dict]], defaults: dict):
        _check("lr", defaults["lr"], defaults["lr"] >= 0, "it must be >= 0")
        _check("delta", defaults["delta"], defaults["delta"] >= 0, "it must be >= 0")
        _check("weight_decay", defaults["weight_decay"], defaults["weight_decay"] >= 0, "it must be >= 0")
        pbw = defaults["precondition_b_with"]
        _check("precondition_b_with", pbw, pbw in PRECONDITION_B_WITH, f"use one of {list(PRECONDITION_B_WITH)}")
        super().__init__(params, {**defaults, "pairs": (), "max_grad_norm": None})
        if not any(g["pairs"] for g in self.param_groups):
            logger.warning(
                "%s found no low-rank pairs in its parameter groups, so nothing is preconditioned (plain %s); "
                "build it with %s.from_model(model) or flylora.optim.riemannian_param_groups(model)",
                type(self).__name__, type(self).__name__.removeprefix("Riemannian"), type(self).__name__,
            )  # fmt: skip

    @classmethod
    def from_model(
        cls, model: nn.Module, *, gate_lr: Optional[float] = None, gate_max_norm: Optional[float] = None, **kwargs
    ):
        """The optimizer over `model`'s trainable parameters, pairs found from its tuner layers."""
        return cls(riemannian_param_groups(model, gate_lr=gate_lr, gate_max_norm=gate_max_norm), **kwargs)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        ids = {id(p) for p in group["params"]}
        for pair in group["pairs"]:
            missing = [t for t in pair.trainable() if id(t) not in ids]
            if missing:
                raise ValueError(f"pair {pair.name}: its trainable factors must be in the same parameter group")

    # pairs hold live tensors and closures: keep them out of (and across) state_dict round trips
    def state_dict(self) -> dict:
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("pairs", None)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        pairs = [g["pairs"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, p in zip(self.param_groups, pairs):
            g["pairs"] = p

    def __repr__(self) -> str:  # torch's repr would print every pair
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                value = f"{len(group[key])} low-rank pairs" if key == "pairs" else group[key]
                lines.append(f"    {key}: {value}")
        return "\n".join(lines + [")"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        failures: list[tuple[str, torch.Tensor]] = []
        for group in self.param_groups:
            if group["max_grad_norm"] is not None:
                with_grad = [p for p in group["params"] if p.grad is not None]
                if with_grad:
                    torch.nn.utils.clip_grad_norm_(with_grad, group["max_grad_norm"])
            done: set[int] = set()
            for pair in group["pairs"]:
                self._step_pair(group, pair, failures)
                done.update(id(t) for t in pair.trainable())
            for p in group["params"]:
                if id(p) not in done and p.grad is not None:
                    self._update(group, p, p.grad)
        self._report(failures)
        return loss

    def _step_pair(self, group: dict, pair: LowRankPair, failures: list) -> None:
        A, B = pair.A, pair.B
        train_A = A is not None and A.requires_grad and A.grad is not None
        train_B = B.requires_grad and B.grad is not None
        args = dict(blocks=pair.blocks, shared_A=pair.shared_A, delta=group["delta"])
        late_B = group["precondition_b_with"] == "updated_a" and train_A
        if train_B and not late_B:  # from A_t, before A moves
            gB, ok = precondition_b(B.grad, pair.a_value(), **args)
            failures.append((f"{pair.name} B", ok))
        if train_A:
            gA, ok = precondition_a(A.grad, B, **args)  # B_t: B has not moved yet
            failures.append((f"{pair.name} A", ok))
            self._update(group, A, gA)
        if train_B:
            if late_B:  # official AdamWr: A_{t+1}
                gB, ok = precondition_b(B.grad, pair.a_value(), **args)
                failures.append((f"{pair.name} B", ok))
            self._update(group, B, gB)

    def _report(self, failures: list) -> None:
        if not failures:
            return
        bad = torch.stack([~ok.all() for _, ok in failures]).cpu().tolist()  # one host sync per step
        names = [name for (name, _), b in zip(failures, bad) if b]
        if names:
            logger.warning(
                "%s: the preconditioner solve failed (singular or non-finite system) for %d factor(s): %s; "
                "those blocks took their unpreconditioned gradient this step",
                type(self).__name__, len(names), ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""),
            )  # fmt: skip

    def _update(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        raise NotImplementedError


class RiemannianSGD(_RiemannianOptimizer):
    """Scaled GD (official `SGDr`) with decoupled weight decay: p ← p − η·wd·p − η·G̃.

    Build with `RiemannianSGD.from_model(model, lr=...)` or from `riemannian_param_groups(model)`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        delta: float = 1e-6,
        precondition_b_with: str = "current_a",
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, delta=delta, precondition_b_with=precondition_b_with)
        super().__init__(params, defaults)

    def _update(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        new = p.float() * (1.0 - lr * wd) - lr * grad.float()
        p.copy_(new)


class RiemannianAdamW(_RiemannianOptimizer):
    """Scaled AdamW (official `AdamWr`): Adam moments of the preconditioned gradient, no bias
    correction by default, eps outside the square root, decoupled weight decay after the step.

    Build with `RiemannianAdamW.from_model(model, lr=..., gate_lr=...)` or from
    `riemannian_param_groups(model)`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = False,
        delta: float = 1e-6,
        precondition_b_with: str = "current_a",
    ):
        for i, b in enumerate(betas):
            _check(f"betas[{i}]", b, 0.0 <= b < 1.0, "it must lie in [0, 1)")
        _check("eps", eps, eps >= 0, "it must be >= 0")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            delta=delta, precondition_b_with=precondition_b_with,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _update(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        (b1, b2), lr = group["betas"], group["lr"]
        g = grad.float()
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        step_size = lr
        if group["correct_bias"]:
            t = state["step"]
            step_size = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        new = p.float().addcdiv(m, v.sqrt().add_(group["eps"]), value=-step_size)
        if group["weight_decay"]:
            new.mul_(1.0 - lr * group["weight_decay"])
        p.copy_(new)
