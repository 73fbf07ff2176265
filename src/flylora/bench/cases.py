"""What `flylora bench` measures: the models, the methods (the same 7 projections, dropout 0)
and one Runner per (model, method), ready to step, all sharing the frozen base weights."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .measure import _clock

TARGETS7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNION_TASKS = (1, 2, 4, 8)
REF_STEP, REF_SIZE, FLOOR, FLY = "lora_r8", "lora_r32", "frozen_base", "flylora_r32k8"


@dataclass
class ModelSpec:
    name: str
    describe: str
    build: Callable[[], torch.nn.Module]
    batch: int
    seq: int
    #: torch threads for this model; None = the run's --threads. The tiny model's ops take
    #: microseconds: a second thread only adds fork/join cost, and on a shared machine a
    #: descheduled worker thread stalls every op, so it runs single-threaded.
    threads: Optional[int] = None


def _llama(**kw) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **kw)).float()


def _smollm2() -> torch.nn.Module:
    from ..models import load_model

    return load_model()  # fp32, converted once from the shipped GGUF and cached


MODELS = {
    "tiny": ModelSpec(
        "tiny", "Llama h64 i128 2 layers, vocab 256 (random init)",
        lambda: _llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256), batch=2, seq=32, threads=1),
    "mid": ModelSpec(
        "mid", "Llama h1024 i2816 4 layers, 16 heads / 4 kv, vocab 8192 (random init)",
        lambda: _llama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=8192), batch=2, seq=128),
    "smollm2": ModelSpec(
        "smollm2", "SmolLM2-135M (embedded default model: h576 i1536 30 layers, vocab 49152)",
        _smollm2, batch=2, seq=64),
}  # fmt: skip


def _method_configs() -> dict[str, Optional[object]]:
    from peft import LoraConfig

    import flylora

    return {
        FLOOR: None,
        FLY: flylora.FlyLoraConfig(r=32, k=8, lora_alpha=64, projection_seed=0, target_modules=TARGETS7),
        "lora_r8": LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS7),
        "lora_r32": LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS7),
        "toplora_r8": flylora.TopLoraConfig(r=8, lora_dropout=0.0, target_modules=TARGETS7),
        "moelora_20x4_top10": flylora.MoeLoraConfig(
            num_experts=20, expert_r=4, top_k=10, lora_dropout=0.0, target_modules=TARGETS7),
    }  # fmt: skip


def adapter_step(model: torch.nn.Module, batch: dict, opt: Optional[torch.optim.Optimizer], autocast_ctx) -> None:
    """Forward (inside `autocast_ctx`) + backward + optimizer step. With no optimizer (the frozen
    base) it back-propagates to the detached input embeddings: the floor every adapter pays."""
    with autocast_ctx:
        if opt is None:
            emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"])
        else:
            out = model(**batch)
    out.loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


@dataclass
class Runner:
    """One method on one model, ready to step: the (PEFT) model, its optimizer, fixed inputs."""

    method: str
    model: torch.nn.Module
    batch: dict
    autocast: bool
    opt: Optional[torch.optim.Optimizer] = None
    routed: bool = False
    clock: str = "wall"  # the clock the bias update is timed with: the one the step is timed with

    def _ctx(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)

    def train_step(self) -> float:
        """One step; returns the seconds spent in update_routing_bias (0 for non-routed methods)."""
        from ..balance import update_routing_bias

        adapter_step(self.model, self.batch, self.opt, self._ctx())
        if not self.routed:
            return 0.0
        tick = _clock(self.clock)
        t = tick()
        update_routing_bias(self.model)
        return tick() - t

    @torch.no_grad()
    def infer(self) -> None:
        with self._ctx():
            self.model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"])


def _share_weights_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters are the *same* tensors as base's: every method wraps its own
    module tree but the frozen weights exist once, so seven methods cost one model's memory."""
    memo = {id(p): p for p in base.parameters()}
    return copy.deepcopy(base, memo)


@torch.no_grad()
def _randomise_trainables(model: torch.nn.Module, seed: int) -> None:
    """Zero-initialised adapter tensors (LoRA/FlyLoRA B) get small random values, so that no
    timing runs on exact zeros and every method computes a real update from the first step."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 1e-3)


def build_runners(spec: ModelSpec, methods: list[str], autocast: bool) -> tuple[dict[str, Runner], torch.nn.Module]:
    from peft import get_peft_model

    base = spec.build().eval()
    for p in base.parameters():
        p.requires_grad_(False)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (spec.batch, spec.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    configs = _method_configs()
    runners = {}
    for i, method in enumerate(methods):
        cfg = configs[method]
        if cfg is None:
            runners[method] = Runner(method, _share_weights_copy(base).train(), batch, autocast)
            continue
        model = get_peft_model(_share_weights_copy(base), copy.deepcopy(cfg)).train()
        _randomise_trainables(model, seed=10 + i)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        runners[method] = Runner(method, model, batch, autocast, opt, routed=(method == FLY))
    return runners, base
