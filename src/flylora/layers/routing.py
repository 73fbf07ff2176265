"""Routing helpers shared by the routed adapters: per-token top-k selection, expert-load counting
that happens exactly once per token that is trained on, and the loss-free load-balancing update.

Why counts are taken in *backward*: an expert's load must count each training token once. Counting
in forward double-counts under non-reentrant gradient checkpointing (forward is re-run in backward)
and counts nothing under reentrant checkpointing (the first forward runs under no_grad). The
autograd node below adds the counts of its forward when its backward runs, which happens exactly
once per optimizer-relevant forward in every case, and never in eval or under ``torch.no_grad()``.

When the bias is updated from those counts is the cadence (``BIAS_CADENCES``): once per optimizer
step by the caller, or after every micro-batch's backward by ``AfterBackward`` below.
"""
from __future__ import annotations

import math

import torch

TOPK_MODES = ("signed", "abs")
BIAS_CADENCES = ("step", "micro_batch")  # when d is updated: once per optimizer step, or per backward
_WIDENS_TO_FP32 = (torch.float32, torch.bfloat16, torch.float16)  # exactly representable in fp32


def select_topk(y: torch.Tensor, bias: torch.Tensor, k: int, topk_on: str = "signed") -> torch.Tensor:
    """Indices of the k experts chosen per token.

    signed (paper Eq. 10, official PEFT path):  I = top-k_i (y_i + d_i)
    abs    (official flylora.py):               I = top-k_i |y_i + d_i|

    The bias d only *selects*; it never enters the adapter output. Selection runs in fp32 so that a
    small d (u = 1e-3 steps) is not rounded away in bf16/fp16.

    y: (..., r), bias: (r,) -> (..., k) int64
    """
    if bias.dtype == torch.float32 and y.dtype in _WIDENS_TO_FP32:
        scores = torch.add(y, bias)  # type promotion gives fp32 in one op: the same values as below
    else:
        scores = y.float() + bias.float()  # (..., r)
    if topk_on == "abs":
        scores = scores.abs()
    elif topk_on != "signed":
        raise ValueError(f"topk_on={topk_on!r} is not allowed; use one of {TOPK_MODES}")
    return scores.topk(k, dim=-1, sorted=False).indices


def selection_mask(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """0/1 mask in y's dtype with ones at idx: (..., r)."""
    return torch.zeros_like(y).scatter_(-1, idx, 1.0)


def expert_counts(mask: torch.Tensor, token_weight: torch.Tensor | None) -> torch.Tensor:
    """c_i = Σ_tokens w_t · mask_{t,i} in fp32, on mask's device (no host sync).

    mask: (..., r); token_weight: mask.shape[:-1] (1 = real token, 0 = padding) or None.
    """
    flat = mask.detach().reshape(-1, mask.shape[-1]).float()  # (tokens, r)
    if token_weight is None:
        return flat.sum(0)
    return token_weight.reshape(-1).to(flat) @ flat  # (r,)


def index_counts(idx: torch.Tensor | None, r: int, token_weight: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`expert_counts(selection_mask(y, idx), token_weight)` from the indices alone, without the
    (..., r) mask: c_i = Σ_tokens w_t · [i ∈ idx_t], fp32, on x's device.

    idx: (..., k) int64, or None when every expert is active (k = r). token_weight: the tokens'
    weights shaped like idx.shape[:-1] (or flat), or already repeated per chosen expert as a flat
    fp32 (N·k,) vector, or None for all ones. x: the layer input (..., n), for the token count
    and device. One index_add_ (no host sync, unlike bincount on an accelerator). The counts
    are sums of 0/1 weights, i.e. exact integers, so they equal the mask-based counts bit for
    bit whatever the summation order.
    """
    if idx is None:
        if token_weight is None:
            return torch.full((r,), float(math.prod(x.shape[:-1])), dtype=torch.float32, device=x.device)
        return token_weight.detach().reshape(-1).float().sum().expand(r).clone()
    flat = idx.detach().reshape(-1)  # (N·k,)
    if token_weight is None:
        w = torch.ones((), dtype=torch.float32, device=flat.device).expand(flat.numel())
    elif token_weight.dim() == 1 and token_weight.numel() == flat.numel() and token_weight.dtype == torch.float32:
        w = token_weight.detach()  # already one weight per (token, chosen expert)
    else:
        w = token_weight.detach().reshape(-1, 1).to(torch.float32).expand(-1, idx.shape[-1]).reshape(-1)
    return torch.zeros(r, dtype=torch.float32, device=flat.device).index_add_(0, flat, w)


class _AddCountsOnBackward(torch.autograd.Function):
    """Identity in forward; in backward adds `counts` into `sink` (see module docstring)."""

    @staticmethod
    def forward(ctx, out, counts, sink):
        ctx.counts, ctx.sink = counts, sink
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.sink.add_(ctx.counts)
        return grad, None, None


def count_on_backward(out: torch.Tensor, counts: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Return `out` unchanged; `sink += counts` happens when gradient flows back through it."""
    if not (torch.is_grad_enabled() and out.requires_grad):
        return out
    return _AddCountsOnBackward.apply(out, counts, sink)


class AfterBackward:
    """Runs `fn` once when a backward pass through the armed outputs has finished.

    `arm(outputs)` (called in a training forward) puts a gradient hook on each output tensor that
    requires grad. The first hook to fire in a backward queues `fn` on the autograd engine
    (`queue_callback`), which runs it after the engine has finished that whole backward: after
    every node, including the counting nodes above, has run. Hooks fire once per backward graph
    task, keyed by its id, so several armed outputs (or a micro-batch seen through two losses)
    queue `fn` once. Why this is exactly once per micro-batch in every setting:
      * plain loop / HF Trainer with gradient accumulation: one `loss.backward()` per micro-batch;
      * non-reentrant gradient checkpointing: the recomputed forwards happen inside the backward,
        before `fn`, and they recompute top-k with the same d as the original forward;
      * reentrant checkpointing: the nested backwards of the checkpointed segments are other graph
        tasks, but the hooks sit on the model outputs, outside any segment, so `fn` is queued on
        the outer backward and runs after all segments;
      * eval / no-grad forwards do not arm (the caller checks), and their outputs have no graph.
    """

    def __init__(self, fn) -> None:
        self.fn = fn
        self._queued_in: int | None = None  # graph task id that already queued fn

    def arm(self, outputs) -> int:
        """Hook the grad-requiring tensors of `outputs` (a tensor, a ModelOutput/dict, or a
        tuple/list of them, one level deep). Returns how many were hooked."""
        tensors = [t for t in _output_tensors(outputs) if t.requires_grad]
        for t in tensors:
            t.register_hook(self._on_grad)
        return len(tensors)

    def _on_grad(self, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._queued_in:  # a new backward (a failed earlier one cannot block it)
            self._queued_in = task
            torch.autograd.Variable._execution_engine.queue_callback(self._run)

    def _run(self) -> None:
        self._queued_in = None
        self.fn()


def _output_tensors(outputs) -> list[torch.Tensor]:
    if torch.is_tensor(outputs):
        return [outputs]
    items = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (tuple, list)) else ()
    out = []
    for v in items:
        if torch.is_tensor(v):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(t for t in v if torch.is_tensor(t))
    return out


@torch.no_grad()
def loss_free_bias_update(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """Paper Eq. 9 (after DeepSeek-V3's loss-free balancing):  d_i ← d_i + u · sign(mean(c) − c_i).

    Under-loaded experts get a larger bias and are picked more often. With no counted tokens
    (all c_i = 0) nothing changes, because sign(0) = 0.
    """
    bias.add_(rate * torch.sign(counts.mean() - counts).to(bias.dtype))


def load_entropy(load: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Load fractions p_i = c_i / Σc and their entropy H = −Σ p_i log p_i (nats)."""
    total = load.sum()
    p = load / total if total > 0 else torch.zeros_like(load)
    h = float(-(p[p > 0] * p[p > 0].log()).sum()) if total > 0 else 0.0
    return p, h
