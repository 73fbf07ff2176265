"""`flylora train <recipe.yaml> [key=value ...]`: train one adapter with the HF Trainer.

    from flylora.pipeline.train import train
    run_dir = train("recipes/cpu/flylora_smollm2.yaml", ["train.max_steps=20"])

Any method (flylora, lora, adalora, lora_fa, toplora, moelora, split_lora, hydralora; see
flylora.pipeline.recipe), any transformers optimizer plus the Riemannian ones, gradient
accumulation, bf16/fp16 autocast, gradient checkpointing (use_reentrant=False by default),
resuming. What the Trainer is given (PEFT config, seeds, dataset, TrainingArguments, callbacks)
is built in flylora.pipeline.trainer; this module runs it in a run folder and records the run.

Run folder (`output.dir`):
  recipe.yaml         the validated recipe (a resume must match it)
  checkpoints/        Trainer checkpoints every `train.save_steps` (adapter, optimizer, RNG states)
  tensorboard/        event files, when the tensorboard package is installed
  adapter/            the final adapter (written to a temp folder, then os.replace'd)
  run.json            recipe, versions, seeds, parameter counts, losses, wall time, data provenance
  .flylora            our marker: `output.overwrite` deletes only a folder that has it (fsutil)
While it trains, the folder is locked (`.<dir>.lock` beside it): a second `train` into it is
refused. A partial checkpoint is skipped on resume, and a run whose last checkpoint is already
the end finishes from it without another step (flylora.pipeline.checkpoints).

Multi-process: `torchrun --nproc_per_node N -m flylora train r.yaml` or
`accelerate launch -m flylora train r.yaml` (DDP; the Trainer's DDP settings are explained in
flylora.pipeline.trainer). After training, every rank hashes its adapter and run.json records
the hashes, so a divergence would show.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .recipe import Recipe, dump_recipe, first_difference, load_recipe

# torch, transformers and .trainer (which imports torch) are imported where they are used, so that
# `flylora train --help` imports nothing heavy. derive_seed and peft_config_kwargs live in .trainer
# and stay importable from here, on first access (module __getattr__ below).
_FROM_TRAINER = ["derive_seed", "peft_config_kwargs"]
__all__ = ["train", "load_run", "tensorboard_available", "adapter_digest", "package_versions", "add_arguments",
           "run", "main"] + _FROM_TRAINER

RUN_VERSION = 1


def __getattr__(name: str):
    if name in _FROM_TRAINER:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    from .trainer import _rank

    if _rank() == 0:
        print(msg, flush=True)


def package_versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    import flylora

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "flylora": flylora.__version__}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def adapter_digest(model) -> str:
    """sha256 over the adapter's saved tensors (name, dtype, shape, bytes), in name order."""
    import torch
    from peft.utils import get_peft_model_state_dict

    h = hashlib.sha256()
    for name, t in sorted(get_peft_model_state_dict(model).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------- run folder
def _prepare_run_dir(recipe: Recipe) -> tuple[Path, str | None]:
    """Create/check the run folder; return (run_dir, checkpoint to resume from or None).

    A folder flylora did not write is never used nor deleted (fsutil); incomplete checkpoints
    (a kill or a full disk mid-save) are skipped, said in one line, and removed."""
    from .checkpoints import last_complete_checkpoint
    from .trainer import _rank
    from ..fsutil import check_writable_target, clean_stale_temps, remove_ours

    run_dir = recipe.run_dir
    o = recipe.output
    check_writable_target(run_dir, "output.dir")
    ckpt_dir = run_dir / "checkpoints"
    finished = (run_dir / "run.json").is_file() and (run_dir / "adapter").is_dir()
    if finished and not o.overwrite:
        raise ValueError(f"{run_dir} already holds a finished run (run.json); set output.overwrite=true "
                         "to train again or choose another output.dir")
    last, skipped = (None, []) if o.overwrite else last_complete_checkpoint(ckpt_dir)
    if o.overwrite or (o.resume == "never" and last is None and not skipped):
        if _rank() == 0 and run_dir.exists() and o.overwrite:
            remove_ours(run_dir, "output.dir")
        _barrier()
        return run_dir, None
    if o.resume == "never":
        raise ValueError(f"{ckpt_dir} holds checkpoints but output.resume=never; set output.overwrite=true to "
                         "start over or output.resume=auto to continue")
    _barrier()  # every rank has looked before rank 0 removes the incomplete ones
    if _rank() == 0:
        clean_stale_temps(run_dir)
        for path, why in skipped:
            import shutil

            print(f"skipping incomplete checkpoint {path} ({why}); "
                  + (f"resuming from {last}" if last else "starting from step 0"), file=sys.stderr, flush=True)
            shutil.rmtree(path, ignore_errors=True)
    _barrier()
    resume = last if o.resume == "auto" else o.resume
    saved = run_dir / "recipe.yaml"
    if resume is not None and saved.is_file():
        from .recipe import yaml_load

        old, new = yaml_load(saved.read_text()), recipe.to_dict()
        old.pop("output", None)
        new.pop("output", None)
        diff = first_difference(old, new)
        if diff:
            raise ValueError(f"cannot resume {run_dir}: {diff[0]} was {diff[1]!r}, the recipe now says "
                             f"{diff[2]!r}; use a new output.dir or output.overwrite=true")
    return run_dir, resume


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    from ..fsutil import atomic_write_text  # temp, fsync, rename

    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------- the API
def train(recipe: str | os.PathLike | dict | Recipe, overrides: Sequence[str] | dict | None = None,
          *, callbacks: Sequence | None = None) -> Path:
    """Train the recipe's adapter; returns the run folder (see the module docstring).

    `overrides`: ["train.lr=1e-3", ...] or {"train.lr": 1e-3}. `callbacks`: extra TrainerCallbacks.
    Raises ValueError with one line for a bad recipe, before any model is loaded. The run folder
    is locked while training: a second `train` into it is refused in one line."""
    import contextlib

    from .trainer import _rank
    from ..fsutil import dir_lock

    recipe = load_recipe(recipe, list(overrides) if isinstance(overrides, (list, tuple)) else overrides)
    # rank 0 holds the lock for all ranks of one (DDP) run
    with dir_lock(recipe.run_dir, "output.dir") if _rank() == 0 else contextlib.nullcontext():
        return _train(recipe, callbacks=callbacks)


def _train(recipe: Recipe, overrides: Sequence[str] | dict | None = None, *,
           callbacks: Sequence | None = None) -> Path:
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, set_seed

    from ..accounting import count_parameters
    from ..merge.io import write_dir_atomically
    from ..models import load_model, load_tokenizer, record_base_model, resolve_model_path
    from .trainer import (_callbacks, _rank, _trainer_class, _world_size, build_dataset, build_peft_config,
                          total_optimizer_steps, training_arguments)

    recipe = load_recipe(recipe, list(overrides) if isinstance(overrides, (list, tuple)) else overrides)
    tb = recipe.output.tensorboard
    if tb and not tensorboard_available():
        raise ValueError("recipe.output.tensorboard: true needs the tensorboard package (pip install tensorboard)")
    tb = tensorboard_available() if tb is None else tb
    start = time.monotonic()
    started = _dt.datetime.now().isoformat(timespec="seconds")

    # data first: a bad task/split fails before the model loads
    from ..fsutil import check_writable_target
    from ..loading import check_model_path

    check_model_path(recipe.model.name_or_path)  # a missing local folder is one line, not a hub error
    check_writable_target(recipe.run_dir, "output.dir")  # a file or someone else's folder: before any work
    model_path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_path, padding_side="right")  # causal-LM training pads on the right
    dataset, data = build_dataset(recipe, tokenizer)
    world = _world_size()
    total_steps = total_optimizer_steps(len(dataset), recipe, world)
    peft_config = build_peft_config(recipe, total_steps)
    args = training_arguments(recipe, recipe.run_dir / "checkpoints", tb)
    _ = args.device  # sets up the device, and the process group under torchrun / accelerate launch
    run_dir, resume = _prepare_run_dir(recipe)
    if _rank() == 0:
        from ..fsutil import ensure_dir

        ensure_dir(run_dir, "output.dir", kind="train")  # one line if a file, read-only, ...
        _atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    old_tb_dir = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if tb:  # read by transformers' TensorBoardCallback when training begins
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")

    set_seed(recipe.train.seed)  # before the adapter exists: LoRA's random A init comes from it
    m = recipe.model
    model = load_model(model_path, dtype=m.dtype, quantization=m.quantization, compute_dtype=m.compute_dtype,
                       double_quant=m.double_quant)
    if m.quantization != "none":  # as the official finetune.py (QLoRA): see flylora.quantization
        from ..quantization import prepare_for_training

        model = prepare_for_training(model, recipe.train.gradient_checkpointing, recipe.train.use_reentrant)
    model = get_peft_model(model, peft_config)
    record_base_model(model.peft_config["default"], recipe.model.name_or_path)  # loadable path + our name
    if recipe.train.gradient_checkpointing and recipe.train.use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    counts = count_parameters(model)
    _log(f"{recipe.name}: {recipe.method.name} on {recipe.model.name_or_path}, task {recipe.data.task} "
         f"({data.split}, {len(dataset)} examples), {counts['trainable']:,} trainable / "
         f"{counts['activated']:,} activated parameters, {total_steps} optimizer steps"
         + (f", resuming from {resume}" if resume else ""))

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=collator,
                               processing_class=tokenizer, callbacks=_callbacks(recipe) + list(callbacks or ()),
                               recipe=recipe)
    try:
        from .checkpoints import train_or_recover

        out = train_or_recover(trainer, resume)  # no extra step when `resume` is already the end
    finally:
        if tb:
            if old_tb_dir is None:
                os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
            else:
                os.environ["TENSORBOARD_LOGGING_DIR"] = old_tb_dir

    digest = adapter_digest(model)
    digests = [digest]
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
    if trainer.is_world_process_zero():
        write_dir_atomically(run_dir / "adapter", lambda tmp: model.save_pretrained(str(tmp)), overwrite=True,
                             kind="adapter")
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        info = {
            "flylora_run_version": RUN_VERSION,
            "name": recipe.name,
            "started": started,
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            "wall_s": round(time.monotonic() - start, 2),  # of this invocation (a resumed run: the rest only)
            "run_dir": str(run_dir),
            "adapter": "adapter",
            "recipe": recipe.to_dict(),
            "method": recipe.method.name,
            "peft_config": _jsonable(model.peft_config["default"].to_dict()),
            "model": {"name_or_path": recipe.model.name_or_path, "resolved_path": model_path,
                      "dtype": recipe.model.dtype, "quantization": recipe.model.quantization},
            "seeds": {"train": recipe.train.seed, "data": recipe.train.data_seed,
                      "projection": getattr(peft_config, "projection_seed", None),
                      "carve": recipe.data.carve_seed if data.split.startswith("carved") else None},
            "data": {"task": recipe.data.task, "split": data.split, "source": data.source, "notes": data.notes,
                     "examples": len(dataset), "tokens": sum(len(r["input_ids"]) for r in dataset.rows)},
            "parameters": dict(counts),  # trainable / activated / stored / total / base, *_pct, by_tensor
            "versions": package_versions(),
            "train": {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
                      "total_steps": total_steps, "train_loss_mean": out.training_loss,
                      "final_loss": losses[-1] if losses else None,
                      "first_loss": losses[0] if losses else None,
                      "resumed_from": resume, "tensorboard": bool(tb),
                      "precision": recipe.train.precision, "optimizer": recipe.train.optimizer,
                      "log_history": trainer.state.log_history},
            "distributed": {"world_size": len(digests), "adapter_sha256_per_rank": digests,
                            "identical": len(set(digests)) == 1},
            "routing": _routing_summary(model),
        }
        _atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2, default=str) + "\n")
        _log(f"final loss {info['train']['final_loss']}, {info['wall_s']:.1f}s -> {run_dir}/adapter, run.json")
    _barrier()
    return run_dir


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _routing_summary(model) -> dict | None:
    """Normalised routing entropy over the FlyLoRA layers (1 = perfectly even expert load)."""
    from ..balance import routing_stats

    stats = [s for s in routing_stats(model).values() if s["tokens"] > 0]
    if not stats:
        return None
    ratios = [s["entropy"] / s["max_entropy"] for s in stats]
    return {"layers": len(stats), "normalised_entropy_mean": sum(ratios) / len(ratios),
            "normalised_entropy_min": min(ratios)}


def load_run(run_dir: str | os.PathLike) -> dict:
    """run.json of a finished run (FileNotFoundError with one line otherwise)."""
    p = Path(run_dir) / "run.json"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir}: no run.json (not a finished `flylora train` run folder)")
    return json.loads(p.read_text())


# ----------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (see recipes/ and docs/pipeline.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides, values parsed as YAML scalars (e.g. train.lr=1e-3 data.limit=64)")
    p.add_argument("--print-recipe", action="store_true", help="print the validated recipe and exit")


def run(args: argparse.Namespace) -> int:
    for o in args.overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r}: expected key.path=value (e.g. train.lr=1e-3)")
    if args.print_recipe:
        sys.stdout.write(dump_recipe(load_recipe(args.recipe, args.overrides)))
        return 0
    train(args.recipe, args.overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flylora train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
