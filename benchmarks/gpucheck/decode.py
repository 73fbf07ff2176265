"""Section 4: inference, greedy decode latency per token with a KV cache, adapters unmerged.

FlyLoRA (k < r cannot merge: the top-k depends on the token) against PEFT LoRA r8 and r32 left
unmerged (what serving several adapters does) and the frozen base, at batch 1 and 16, on the
training section's ~1B base (bf16 weights, bf16 autocast). The prompt is prefilled untimed, two
decode steps warm up, then each of `new_tokens` one-token forwards is a span between CUDA events;
the next token is the argmax kept on the device, so the loop never waits for the host.
"""
from __future__ import annotations

import torch

from .common import Budget, Device, Timer, attempt, build_llama, median, peft_copy, ratio

METHODS = ("frozen_base", "flylora_r32k8", "lora_r8", "lora_r32")


@torch.no_grad()
def decode_per_token(model, vocab: int, batch: int, prompt: int, new: int, device: Device) -> float:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device.torch)
    timer = Timer(device)
    with device.autocast(torch.bfloat16):
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(2 + new):
            if i < 2:
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            else:
                with timer.span():
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return median(timer.seconds())


def decode_method(base, method: str, seed: int, sizes, device: Device) -> dict:
    model = peft_copy(base, method, seed).eval()
    model.config.use_cache = True
    row = {f"batch={b}": decode_per_token(model, base.config.vocab_size, b, sizes.prompt, sizes.new_tokens, device)
           for b in sizes.decode_batches}  # fmt: skip
    del model
    device.free()
    return row


def run_decode(sizes, device: Device, budget: Budget, log) -> dict:
    base = build_llama(sizes.train_model, device, torch.bfloat16)
    out: dict = {"model": sizes.train_model.describe(), "prompt_tokens": sizes.prompt,
                 "timed_tokens": sizes.new_tokens, "adapters": "unmerged", "per_token_s": {}}  # fmt: skip
    need = 5.0
    for i, method in enumerate(METHODS):
        if not budget.allows(f"decode/{method}", need):
            continue
        t = budget.elapsed()
        row = attempt(out, f"decode/{method}", lambda: decode_method(base, method, 40 + i, sizes, device), device, log)
        need = 1.3 * (budget.elapsed() - t)
        if row is None:
            continue
        out["per_token_s"][method] = row
        log(f"decode {method}: " + ", ".join(f"{k} {v * 1e3:.2f} ms/token" for k, v in row.items()))
    per = out["per_token_s"]
    out["ratios"] = {
        f"{a}_vs_{b}@{k}": ratio(per.get(a, {}).get(k), per.get(b, {}).get(k))
        for k in (f"batch={b}" for b in sizes.decode_batches)
        for a, b in (("flylora_r32k8", "lora_r8"), ("flylora_r32k8", "lora_r32"), ("flylora_r32k8", "frozen_base"))
    }
    del base
    device.free()
    return out
