"""Evaluate a model (+ adapters) on tasks: the Python API behind `flylora eval`.

    from flylora.evaluation.evaluate import evaluate
    res = evaluate(["mmlu"], model=None, limit=50, out_dir="runs/eval/demo")   # embedded model
    res["results"][0]["score"]

Each task is scored by generation (flylora.evaluation.inference.generate, greedy unless a
temperature is given) or, with `mode="loglik"`, lm-eval style from the log-likelihood of each
choice (`loglikelihoods`), also reported normalised by characters and by tokens. Every run
writes `results.json`, `results.md` and one `outputs/<adapter>__<task>.jsonl` with each
example's prompt, response and verdict. The CLI is flylora.evaluation.cli.

Adapters load with `peft.PeftModel.from_pretrained(model, path, adapter_name=...)`; importing
flylora registers the FlyLoRA PEFT types, and plain PEFT LoRA adapters work too. Several
adapters are evaluated one at a time (`adapter_mode="each"`) or all active together ("stack").
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

from ..models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path, set_threads
from ..tasks import expand, get_task
from ..tasks.base import Task
from ..tasks.scoring import char_length, choose_by_loglik
from ..tasks.sources import Loaded
from .inference import generate, loglikelihoods
from .options import EVAL_SPLITS, LOGLIK_NORMS, check_ignored


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
    from ..loading import load_adapter  # the one checked loader: truncated or NaN weights are one line

    for name, path in adapters:
        model = load_adapter(model, path, adapter_name=name)
    return model.eval()


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
    check_ignored(task, mode=mode, scoring_mode=scoring_mode, **_)


def load_eval_data(task: Task, *, split: str = "test", data_path: str | None = None,
                   limit: int | None = None, limit_seed: int | None = None, carve_seed: int = 0,
                   carve_fraction: float = 0.5, **_) -> Loaded:
    return task.load(split, data_path, limit=limit, seed=carve_seed, train_fraction=carve_fraction,
                     limit_seed=limit_seed)


def _filename(s: str) -> str:
    return re.sub(r"[^\w.-]+", "-", s)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from ..fsutil import atomic_write_text

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
        from ..execution import Limits

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
        from ..loading import check_model_path

        check_model_path(model)
    out = None
    if out_dir is not None:  # a file, a read-only folder or someone else's folder: one line, now
        from ..fsutil import ensure_dir

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
            from ..fsutil import dir_lock

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
    from ..fsutil import atomic_write_text, ensure_dir

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
