"""FlyLoRA (Zou et al., NeurIPS 2025, arXiv 2510.08396), the layer as pure PyTorch.

    y    = A x                                    A ∈ R^{r×n}: frozen, sparse, random
    I(x) = top-k_i (y_i + d_i)                    d ∈ R^r: load-balancing bias, selects only
    f(x) = W0 x + (α/r) · B (mask_I ⊙ y)          B ∈ R^{m×r}: zero-initialised, the only trainable tensor

A has exactly p = round(sparsity·n) nonzeros in every row, at random columns, with values
N(0, 1/r²) (std 1/r). sparsity defaults to k/r (paper §4.1). A is generated on a CPU
``torch.Generator`` from a seed, so an adapter file never has to store it.

Gradients flow to x through A x (the official layer computes A x under ``no_grad``, which cuts
every adapter path out of the gradient to earlier layers; we do not).
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.nn import functional as F

from .routing import count_on_backward, index_counts, loss_free_bias_update, select_topk


def check_hyperparameters(r: int, k: int, sparsity: float | None, in_features: int | None = None) -> int | None:
    """Validate (r, k, sparsity) and return p = round(sparsity·n) when n is given."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r} is not allowed: r must be a positive integer")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k={k!r} is not allowed: k must be a positive integer (1 <= k <= r={r})")
    if k > r:
        raise ValueError(f"k={k} is not allowed: k must satisfy 1 <= k <= r={r}")
    rho = k / r if sparsity is None else sparsity
    if not (isinstance(rho, (int, float)) and 0.0 < rho <= 1.0):
        raise ValueError(f"sparsity={sparsity!r} is not allowed: it must lie in (0, 1]")
    if in_features is None:
        return None
    p = round(rho * in_features)
    if p < 1:
        raise ValueError(
            f"sparsity={rho} gives p = round({rho}·{in_features}) = 0 nonzeros per row of A; "
            f"use sparsity >= {0.5 / in_features:.3g} for in_features={in_features}"
        )
    return p


def layer_seed(projection_seed: int, layer_key: str) -> int:
    """A stable 63-bit seed per (adapter seed, layer name). Python's hash() is salted per process,
    so it would make A irreproducible; sha256 is the same everywhere."""
    digest = hashlib.sha256(f"flylora-A/{int(projection_seed)}/{layer_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sparse_projection(r: int, n: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse form of A: column indices (r, p) int32 and values (r, p) fp32.

    Each row gets p distinct columns (a random permutation's first p entries, drawn per row as in
    the official `torch.randperm(n)[:p]`) and N(0, 1/r²) values; generated on CPU so the result
    does not depend on the accelerator.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    cols = torch.stack([torch.randperm(n, generator=g)[:p] for _ in range(r)])  # (r, p)
    cols = cols.sort(dim=1).values.to(torch.int32)
    vals = torch.randn(r, p, generator=g) / r  # (r, p), std 1/r
    return cols, vals


def densify(cols: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """Dense A (r, n) from its sparse form."""
    a = torch.zeros(cols.shape[0], n, dtype=vals.dtype, device=vals.device)
    return a.scatter_(1, cols.long(), vals)


def _matmul_operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` for a matmul with a `dtype` operand, skipped where it cannot change the result.

    Under autocast the matmul casts both operands to the autocast dtype itself. When `dtype` is
    fp32 and t is bf16/fp16 the cast here is an exact widening that autocast immediately undoes:
    same values, but two (..., n) copies forward and two more in backward (an o_proj/down_proj
    input is bf16 under autocast while the frozen A is fp32), so we leave t as it is.
    """
    if (
        t.dtype != dtype
        and dtype == torch.float32
        and t.dtype in (torch.bfloat16, torch.float16)
        and torch.is_autocast_enabled(t.device.type)
    ):
        return t
    return t.to(dtype)


# (significand bits, min normal exponent, max exponent) of the float formats a layer may run in
_FORMATS = {
    torch.float64: (53, -1022, 1023),
    torch.float32: (24, -126, 127),
    torch.bfloat16: (8, -126, 127),
    torch.float16: (11, -14, 15),
}


def _exact_in(scale: float, dtype: torch.dtype) -> bool:
    """Whether `scale` is exactly representable in `dtype`. Plain float arithmetic (no tensor and
    no .item()), so torch.compile traces it as a constant instead of breaking the graph."""
    fmt = _FORMATS.get(dtype)
    if fmt is None or not math.isfinite(scale):
        return False
    if scale == 0:
        return True
    bits, emin, emax = fmt
    mant, exp = math.frexp(scale)  # scale = mant·2^exp, 0.5 <= |mant| < 1
    scaled = mant * 2.0**bits
    return scaled == int(scaled) and emin <= exp - 1 <= emax


def routed_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    scale: float,
    topk_on: str = "signed",
    dropout: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(α/r) · B (mask ⊙ A x) and the chosen experts' indices (..., k), or None when k = r.

    The layers' hot path; `flylora_delta` is the same computation returning the 0/1 mask. Where
    the work goes (…, r tensors are r/m of an output's size, so the (…, m) passes dominate):
      * the selection runs on y.detach(): it only yields indices, so no autograd nodes or saved
        tensors are made for it;
      * α/r multiplies the (…, r) routed activations, not the (…, m) output, saving one (…, m)
        pass forward and one in backward: it is folded into the scatter that places the
        selected y_i, so routed = y ⊙ (α/r)·mask costs one multiply, as y ⊙ mask did. For a
        power-of-two α/r (α = 2r, the default, gives 2) this is bit-identical to scaling the
        output; otherwise it differs by float rounding only;
      * no casts that autocast would undo (see `_matmul_operand`).
    Backward saves A (a buffer, no copy), the (…, r) scaled mask and routed activations, and B;
    never x, which is why FlyLoRA needs less activation memory than LoRA (whose trainable A
    needs x for its gradient).
    """
    h = dropout(x) if dropout is not None else x
    y = F.linear(_matmul_operand(h, A.dtype), A)  # (..., r) = h Aᵀ; one call instead of .t() and @
    r = A.shape[0]
    if k == r:  # every expert active: no selection needed (LoRA-FA)
        idx = None
        routed = y * scale
    else:
        idx = select_topk(y.detach(), bias, k, topk_on)  # (..., k)
        # the scaled mask in y's dtype when α/r is exact there (no copy for the matmul), else fp32
        wdt = y.dtype if _exact_in(float(scale), y.dtype) else torch.promote_types(y.dtype, torch.float32)
        weights = torch.zeros(y.shape, dtype=wdt, device=y.device).scatter_(-1, idx, scale)  # (α/r)·mask
        routed = y * weights  # (..., r)
    return F.linear(_matmul_operand(routed, B.dtype), B), idx  # (..., m) = routed Bᵀ


def flylora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    scale: float,
    topk_on: str = "signed",
    dropout: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α/r) · B (mask ⊙ A x) and the 0/1 expert mask.

    x: (..., n), A: (r, n), B: (m, r), bias: (r,) -> delta (..., m), mask (..., r)
    """
    delta, idx = routed_delta(x, A, B, bias, k, scale, topk_on, dropout)
    # the mask in y = A x's dtype: A's, or the autocast dtype when autocast ran the matmul
    dtype = A.dtype
    if torch.is_autocast_enabled(x.device.type) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.get_autocast_dtype(x.device.type)
    mask = torch.zeros((*delta.shape[:-1], A.shape[0]), dtype=dtype, device=delta.device)
    return delta, mask.fill_(1.0) if idx is None else mask.scatter_(-1, idx, 1.0)


class FlyLoraLinear(nn.Module):
    """A FlyLoRA-adapted nn.Linear for use without PEFT.

    ``update_bias()`` applies the load-balancing rule to the counts gathered since the last call;
    call it once per optimizer step. (The PEFT method in ``flylora.tuners`` is the same
    computation with PEFT's multi-adapter semantics.) ``alpha`` defaults to 2r, the paper's
    α/r = 2 (r=32, α=64). The routing bias and its counts stay fp32 through ``.half()`` /
    ``.to(torch.bfloat16)``: in fp16 a 1e-3 step is lost once |d| ≥ 4.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 32,
        k: int = 8,
        alpha: float | None = None,
        sparsity: float | None = None,
        topk_on: str = "signed",
        bias_update_rate: float = 1e-3,
        seed: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        p = check_hyperparameters(r, k, sparsity, base.in_features)
        alpha = 2.0 * r if alpha is None else alpha
        self.base, self.r, self.k, self.scale = base, r, k, alpha / r
        self.topk_on, self.bias_update_rate = topk_on, bias_update_rate
        cols, vals = sparse_projection(r, base.in_features, p, seed)
        dev, dt = base.weight.device, base.weight.dtype
        self.register_buffer("A", densify(cols, vals, base.in_features).to(dev, dt), persistent=False)
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))
        self.register_buffer("routing_bias", torch.zeros(r, device=dev))  # fp32 always
        self.register_buffer("counts", torch.zeros(r, device=dev), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        base.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        before = {name: self._buffers[name] for name in ("routing_bias", "counts")}
        super()._apply(fn, recurse)
        for name, old in before.items():  # casts move them, but they keep their fp32 values
            t = self._buffers[name]
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                self._buffers[name] = old.float().to(t.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta, idx = routed_delta(x, self.A, self.B, self.routing_bias, self.k, self.scale, self.topk_on, self.dropout)
        if self.training:
            delta = count_on_backward(delta, index_counts(idx, self.r, None, x), self.counts)
        return self.base(x) + delta.to(x.dtype)

    @torch.no_grad()
    def update_bias(self) -> None:
        loss_free_bias_update(self.routing_bias, self.counts, self.bias_update_rate)
        self.counts.zero_()
