"""What `flylora train` hands to the HF Trainer: the PEFT config, the tokenized dataset, the
step count, the Trainer subclass, its callbacks and its TrainingArguments (flylora.pipeline.train
runs them in a run folder).

Seeds. `train.seed` drives everything random in training: data order, dropout, the random init
of LoRA's A (set before the adapter is created). FlyLoRA's and LoRA-FA's frozen A is NOT drawn
from it: it comes from `method.config.projection_seed`, and when the recipe leaves that unset it
is derived as sha256("projection", train.seed, data.task). So every task gets its own
independent A (the paper's merge argument needs that; the official code's `set_seed(23)` before
every task gives them all the same A), a rerun of the same recipe gets the same A, and a resumed
run regenerates exactly the A it was trained with. Set projection_seed explicitly to share one A.

Multi-process (DDP). The Trainer gets ddp_find_unused_parameters=False (every adapter tensor is
in every forward's graph: unselected FlyLoRA experts get a zero gradient through the mask, not a
missing one, so DDP's extra unused-parameter traversal is wasted work) and
ddp_broadcast_buffers=False (the only adapter buffers are FlyLoRA's A, regenerated from the same
seed on every rank, and the routing bias d, which `update_routing_bias` changes identically on
every rank from all-reduced counts; broadcasting them from rank 0 before every forward would only
move r·n floats per layer per step). Both can be switched back on in the recipe.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .recipe import RIEMANNIAN, Recipe, method_config_class

FRESH_SEED_METHODS = ("flylora", "lora_fa")  # methods whose frozen A comes from projection_seed


# ----------------------------------------------------------------------------------- seeds, ranks
def derive_seed(*parts: Any) -> int:
    """A stable 62-bit seed from any values (sha256, so it is the same in every process)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------------- building
def peft_config_kwargs(recipe: Recipe, total_steps: int | None = None) -> dict:
    """The method's config kwargs with the defaults this pipeline fills in (see module docstring)."""
    from ..tuners.base import DEFAULT_TARGET_MODULES

    name, kwargs = recipe.method.name, dict(recipe.method.config)
    if name in FRESH_SEED_METHODS and kwargs.get("projection_seed") is None:
        kwargs["projection_seed"] = derive_seed("projection", recipe.train.seed, recipe.data.task)
    if name in ("lora", "adalora") and kwargs.get("target_modules") is None:
        kwargs["target_modules"] = list(DEFAULT_TARGET_MODULES)  # the paper adapts all 7 projections
    if name == "adalora" and kwargs.get("total_step") is None and total_steps is not None:
        kwargs["total_step"] = total_steps  # AdaLoRA's rank schedule needs the run length
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return kwargs


def build_peft_config(recipe: Recipe, total_steps: int | None = None):
    cls = method_config_class(recipe.method.name)
    kwargs = peft_config_kwargs(recipe, total_steps)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"recipe.method.config: {str(e).splitlines()[0]}") from None


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def build_dataset(recipe: Recipe, tokenizer):
    """(TokenizedDataset, Loaded provenance) for the recipe's task and split."""
    from ..tasks import get_task

    d = recipe.data
    task = get_task(d.task)
    data = task.load(d.split, d.path, limit=d.limit, seed=d.carve_seed, train_fraction=d.carve_fraction,
                     limit_seed=d.limit_seed)
    rows = [task.tokenize(ex, tokenizer, cutoff_len=d.cutoff_len, train_on_inputs=d.train_on_inputs,
                          add_eos=d.add_eos, template=d.template, chat=d.chat_template,
                          truncation=d.truncation) for ex in data.rows]
    return TokenizedDataset(rows), data


def steps_per_epoch(n_examples: int, recipe: Recipe, world_size: int) -> int:
    t = recipe.train
    batches = -(-n_examples // (t.micro_batch_size * world_size))  # ceil: the last batch is kept
    return max(1, batches // t.gradient_accumulation)


def total_optimizer_steps(n_examples: int, recipe: Recipe, world_size: int) -> int:
    t = recipe.train
    if t.max_steps > 0:
        return t.max_steps
    return max(1, int(-(-t.epochs * steps_per_epoch(n_examples, recipe, world_size) // 1)))


# ----------------------------------------------------------------------------------- trainer
def _trainer_class():
    from transformers import Trainer

    class FlyLoraTrainer(Trainer):
        """HF Trainer plus: the Riemannian optimizers (`create_optimizer`), and MoE-LoRA's optional
        load-balancing loss added to the task loss."""

        def __init__(self, *args, recipe: Recipe, **kwargs):
            self.recipe = recipe
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model=None):
            t = self.recipe.train
            if t.optimizer not in RIEMANNIAN:
                return super().create_optimizer(model) if model is not None else super().create_optimizer()
            if self.optimizer is None:
                from ..optim import RiemannianAdamW, RiemannianSGD

                cls = RiemannianAdamW if t.optimizer == "riemannian_adamw" else RiemannianSGD
                kwargs = {"lr": t.lr, "weight_decay": t.weight_decay, **t.optimizer_args}
                try:  # pairs come from the tuner layers of the unwrapped model
                    self.optimizer = cls.from_model(self.model, gate_lr=t.gate_lr, gate_max_norm=t.gate_max_norm,
                                                    **kwargs)
                except TypeError as e:
                    raise ValueError(f"recipe.train.optimizer_args: {e}") from None
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if self.recipe.method.name != "moelora" or not model.training:
                return out
            from ..tuners.moelora import moe_aux_loss

            aux = moe_aux_loss(model)
            if aux.requires_grad or aux.item() != 0:
                # the task loss is already normalised over the accumulated batch when the model
                # takes num_items_in_batch; the aux loss is a per-micro-batch mean, so average it too
                if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                    aux = aux / self.current_gradient_accumulation_steps
                if return_outputs:
                    return out[0] + aux.to(out[0].device), out[1]
                return out + aux.to(out.device)
            return out

    return FlyLoraTrainer


def _callbacks(recipe: Recipe) -> list:
    from transformers import TrainerCallback

    from ..balance import RoutingBiasCallback
    from .checkpoints import complete_marker_callback

    cbs: list = [RoutingBiasCallback()]  # once per optimizer step, counts all-reduced under DDP
    cbs.append(complete_marker_callback())  # fsync + mark each checkpoint once fully written
    if recipe.method.name == "adalora":
        class AdaLoraAllocator(TrainerCallback):
            """AdaLoRA's rank budget: update_and_allocate after each step, before zero_grad."""

            def on_optimizer_step(self, args, state, control, model=None, **kwargs):
                model.base_model.update_and_allocate(state.global_step)

        cbs.append(AdaLoraAllocator())
    return cbs


def training_arguments(recipe: Recipe, checkpoint_dir: Path, tensorboard: bool):
    from transformers import TrainingArguments

    t = recipe.train
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("recipe.train.precision: fp16 autocast needs a CUDA GPU; use bf16 on CPU")
    kwargs = dict(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        lr_scheduler_kwargs=dict(t.lr_scheduler_kwargs),
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,  # < 1: a ratio
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,  # 0 disables clipping
        optim=t.optimizer if t.optimizer not in RIEMANNIAN else "adamw_torch",  # the latter unused
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        seed=t.seed,
        data_seed=t.data_seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=["tensorboard"] if tensorboard else "none",
        ddp_find_unused_parameters=t.ddp_find_unused_parameters,
        ddp_broadcast_buffers=t.ddp_broadcast_buffers,
        ddp_backend="gloo" if _world_size() > 1 and not torch.cuda.is_available() else None,
        remove_unused_columns=False,  # our dataset is already model inputs; PEFT hides forward's signature
        label_names=["labels"],
        dataloader_num_workers=t.dataloader_num_workers,
        disable_tqdm=not recipe.output.progress,
        use_cpu=not torch.cuda.is_available(),
    )
    # transformers 5 renamed these; keep older releases (>= 4.46) working too
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[ckpt] = t.gradient_checkpointing
    kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": t.use_reentrant}
    if "train_sampling_strategy" in fields:
        kwargs["train_sampling_strategy"] = "group_by_length" if t.group_by_length else "random"
    else:
        kwargs["group_by_length"] = t.group_by_length
    return TrainingArguments(**kwargs)
