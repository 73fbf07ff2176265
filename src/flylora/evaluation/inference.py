"""Batched inference for evaluation: generation and multiple-choice log-likelihoods.

Generation is batched with left padding and attention masks (greedy unless a temperature is
given), prompts sorted by length so batches pad little. `loglikelihoods` scores (context,
continuation) pairs lm-eval style: the sum of the continuation's token log-probs given the
context, with one shared forward of a context for all of its choices.
"""
from __future__ import annotations

from typing import Sequence

from ..models import autocast


def _truncate(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
             temperature: float = 0.0, top_p: float = 1.0, num_samples: int = 1,
             stop: Sequence[str] = (), add_special_tokens: bool = True, bf16_autocast: bool = False,
             seed: int = 0, progress: bool = True, desc: str = "generating") -> list[list[str]]:
    """`num_samples` completions per prompt (greedy when temperature == 0). Left padding with an
    attention mask; an explicit GenerationConfig so the model's own sampling defaults never
    leak in; decoding stops at EOS or at any `stop` string, which is also cut from the text."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    if temperature < 0 or not 0 < top_p <= 1 or num_samples < 1 or batch_size < 1:
        raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_p={top_p} "
                         f"(0, 1], num_samples={num_samples} (>= 1), batch_size={batch_size} (>= 1)")
    if num_samples > 1 and temperature == 0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples are identical)")
    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs tokenizer.padding_side == 'left'")
    sampling = temperature > 0
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                           temperature=temperature if sampling else None,
                           top_p=top_p if sampling else None, top_k=0 if sampling else None,
                           num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id,
                           stop_strings=list(stop) or None)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    lengths = [len(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # long first: OOM shows early
    out: list[list[str]] = [[] for _ in prompts]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens).to(device)
        with torch.inference_mode(), autocast(device, bf16_autocast):
            gen = model.generate(**enc, generation_config=cfg, tokenizer=tokenizer)
        new = gen[:, enc["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for j, text in enumerate(texts):
            out[idx[j // num_samples]].append(_truncate(text, stop))
    return out


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                   add_special_tokens: bool = True, bf16_autocast: bool = False,
                   progress: bool = True, desc: str = "log-likelihood") -> list[tuple[float, int]]:
    """(sum of log p(continuation tokens | context), number of continuation tokens) per request.

    As lm-eval: trailing spaces of the context move to the continuation; the continuation's
    tokens are those of tokenize(context + continuation) after the first len(tokenize(context)).

    Requests whose context tokens are identical (the k choices of one question) share one forward
    of the context: `batch_size` contexts run left-padded with explicit position ids and a KV cache,
    then every continuation runs on its own copy of its context's cache. The numbers are those of
    one forward of context + continuation (tests check it), at about 1/k of the context's cost.
    """
    import torch
    from tqdm import tqdm

    items: list[tuple[tuple[int, ...], list[int]]] = []  # (context tokens, continuation tokens)
    for ctx, cont in requests:
        n = len(ctx) - len(ctx.rstrip(" "))
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        c = tokenizer(ctx, add_special_tokens=add_special_tokens)["input_ids"]
        w = tokenizer(ctx + cont, add_special_tokens=add_special_tokens)["input_ids"]
        if not c or len(w) <= len(c):
            raise ValueError(f"empty context or continuation in log-likelihood request {cont!r}")
        items.append((tuple(w[:len(c)]), w[len(c):]))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx_ids, _) in enumerate(items):
        groups.setdefault(ctx_ids, []).append(i)
    contexts = sorted(groups, key=len, reverse=True)  # long first: an out-of-memory shows early
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    batches = [contexts[i:i + batch_size] for i in range(0, len(contexts), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, ctx_ids in enumerate(batch):  # left padding: every context ends at the last column
            ids[r, width - len(ctx_ids):] = torch.tensor(ctx_ids)
            mask[r, width - len(ctx_ids):] = 1
        rows = [(r, i) for r, ctx_ids in enumerate(batch) for i in groups[ctx_ids]]
        select = torch.tensor([r for r, _ in rows])
        conts = [items[i][1] for _, i in rows]
        with torch.inference_mode(), autocast(device, bf16_autocast):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(res.logits[:, -1].float(), dim=-1).cpu()  # (contexts, vocab)
            rest = None
            tail = max(map(len, conts)) - 1  # continuation tokens after the first are predicted here
            if tail > 0:
                cache = res.past_key_values
                cache.batch_select_indices(select.to(device))  # one copy of the context per request
                cids = torch.full((len(rows), tail), pad, dtype=torch.long)
                cmask = torch.zeros((len(rows), tail), dtype=torch.long)
                for j, cont in enumerate(conts):  # right padding after the context
                    cids[j, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                    cmask[j, :len(cont) - 1] = 1
                cpos = mask.sum(-1)[select, None] + torch.arange(tail)
                logits = model(input_ids=cids.to(device), attention_mask=torch.cat([mask[select], cmask], 1).to(device),
                               position_ids=cpos.to(device), past_key_values=cache, use_cache=True).logits
                rest = torch.log_softmax(logits.float(), dim=-1).cpu()  # (requests, tail, vocab)
        for j, ((r, i), cont) in enumerate(zip(rows, conts)):
            lp = first[r, cont[0]].item()
            if len(cont) > 1:
                lp += rest[j, :len(cont) - 1].gather(1, torch.tensor(cont[1:])[:, None]).sum().item()
            out[i] = (lp, len(cont))
    return out
