"""Section 1, parity: FlyLoRA / TopLoRA / MoE-LoRA on the device vs on CPU, same weights, same tokens.

For each method one PEFT model is built on CPU in fp32 (the reference) and deep-copied to the
device. Both run forward + backward of the LM loss on the same batch; we report

  max |logits_dev − logits_cpu|, max |∂L/∂B_dev − ∂L/∂B_cpu| over every adapted layer's B
  (with the reference's max |·| so the differences can be read relative to it),

for the device in fp32, under bf16 autocast and under fp16 autocast, plus the device's fp32
run-to-run difference (a non-deterministic kernel shows up there). For the routed methods the
expert selection of every (layer, token) is recorded and compared with the CPU fp32 one:

  exact-set agreement  = share of (layer, token) whose chosen set is identical,
  slot agreement       = |S_dev ∩ S_cpu| / |S_cpu| summed over (layer, token).

The selections are captured by wrapping `flylora.layers.flylora.select_topk` and
`flylora.layers.moelora.route` for the duration of one forward (restored afterwards).
"""
from __future__ import annotations

import contextlib
import copy
import re
from typing import Iterator, Optional

import torch

from .common import Budget, Device, attempt, build_llama, peft_copy, token_batch

METHODS = ("flylora_r32k8", "toplora_r8", "moelora_20x4_top10")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
B_PARAM = re.compile(r"\.(flylora|toplora|moelora)_B\.")


@contextlib.contextmanager
def capture_selections() -> Iterator[list[torch.Tensor]]:
    """Record every routed layer's 0/1 selection mask (..., r or E) as a CPU bool tensor."""
    import flylora.layers.flylora as fly
    import flylora.layers.moelora as moe

    seen: list[torch.Tensor] = []
    select_topk, route = fly.select_topk, moe.route

    def rec_select(y, bias, k, topk_on="signed"):
        idx = select_topk(y, bias, k, topk_on)
        seen.append(torch.zeros(y.shape, dtype=torch.bool, device=y.device).scatter_(-1, idx, True).cpu())
        return idx

    def rec_route(x, gate_weight, top_k):
        g, probs, mask = route(x, gate_weight, top_k)
        seen.append(mask.detach().bool().cpu())
        return g, probs, mask

    fly.select_topk, moe.route = rec_select, rec_route
    try:
        yield seen
    finally:
        fly.select_topk, moe.route = select_topk, route


def forward_backward(model, batch: dict, device: Device, dtype: Optional[torch.dtype]) -> dict:
    model.zero_grad(set_to_none=True)
    with capture_selections() as sel:
        with device.autocast(dtype):
            out = model(**batch)
        out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if B_PARAM.search(n)}
    return {"logits": out.logits.detach().float().cpu(), "grads": grads, "selections": sel}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b) or not a:
        raise RuntimeError(f"B-gradient sets differ or are empty: {sorted(a)[:3]} vs {sorted(b)[:3]}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def agreement(test: list[torch.Tensor], ref: list[torch.Tensor]) -> Optional[dict]:
    if not ref:
        return None
    if len(test) != len(ref):
        raise RuntimeError(f"{len(test)} routed calls on the device vs {len(ref)} on CPU")
    same = sum(int((t == r).all(-1).sum()) for t, r in zip(test, ref))
    tokens = sum(r[..., 0].numel() for r in ref)
    slots = sum(int((t & r).sum()) for t, r in zip(test, ref))
    chosen = sum(int(r.sum()) for r in ref)
    return {"exact_set": same / tokens, "slot": slots / chosen, "routed_tokens": tokens}


def compare(run: dict, ref: dict) -> dict:
    return {
        "logits_max_abs_diff": float((run["logits"] - ref["logits"]).abs().max()),
        "b_grad_max_abs_diff": _max_diff(run["grads"], ref["grads"]),
        "selection_agreement": agreement(run["selections"], ref["selections"]),
    }


def parity_of(base, method: str, seed: int, batch_cpu: dict, batch_dev: dict, device: Device) -> dict:
    ref_model = peft_copy(base, method, seed).train()
    dev_model = copy.deepcopy(ref_model).to(device.torch)
    ref = forward_backward(ref_model, batch_cpu, Device("cpu"), None)
    res = {"ref_logits_max_abs": float(ref["logits"].abs().max()),
           "ref_b_grad_max_abs": max(float(g.abs().max()) for g in ref["grads"].values())}  # fmt: skip
    first = None
    for name, dtype in PRECISIONS.items():
        run = forward_backward(dev_model, batch_dev, device, dtype)
        res[name] = compare(run, ref)
        if name == "fp32":
            first = run
    again = forward_backward(dev_model, batch_dev, device, None)
    res["fp32_run_to_run"] = {
        "logits_max_abs_diff": float((again["logits"] - first["logits"]).abs().max()),
        "b_grad_max_abs_diff": _max_diff(again["grads"], first["grads"]),
    }
    del ref_model, dev_model
    device.free()
    return res


def run_parity(sizes, device: Device, budget: Budget, log) -> dict:
    base = build_llama(sizes.parity_model, Device("cpu"), torch.float32)
    batch_cpu = token_batch(sizes.parity_model.vocab, *sizes.parity_batch, Device("cpu"))
    batch_dev = {k: v.to(device.torch) for k, v in batch_cpu.items()}
    out = {"model": sizes.parity_model.describe(), "batch": list(sizes.parity_batch),
           "reference": "cpu fp32", "tested": f"{device.type} (fp32 weights; bf16/fp16 = autocast)",
           "methods": {}}  # fmt: skip
    if not device.cuda:
        out["note"] = "no CUDA device: the 'device' side is the CPU too, so this checks the code path, not CUDA"
    for i, method in enumerate(METHODS):
        if not budget.allows(f"parity/{method}", 5.0):
            continue
        res = attempt(out, f"parity/{method}", lambda: parity_of(base, method, 20 + i, batch_cpu, batch_dev, device),
                      device, log)
        if res is None:
            continue
        out["methods"][method] = res
        log(f"parity {method}: fp32 logits Δ {res['fp32']['logits_max_abs_diff']:.2e}, "
            f"B-grad Δ {res['fp32']['b_grad_max_abs_diff']:.2e}")  # fmt: skip
    return out
