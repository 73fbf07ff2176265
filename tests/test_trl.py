"""Training flylora adapters through TRL's `SFTTrainer` (the `trl` extra).

TRL calls `peft.get_peft_model` itself with our config (`peft_config=`), under its own defaults
(gradient checkpointing on, bf16 autocast). For FlyLoRA (both bias cadences), TopLoRA and MoE-LoRA
with the Riemannian optimizer, on a tiny local Llama:
  * only the adapter's tensors require grad, and every one of them trained; base weights unchanged;
  * FlyLoRA's routing bias d is exactly u·Σ sign(mean(c) − c) over the expected number of updates
    (one per optimizer step with RoutingBiasCallback, one per micro-batch with "micro_batch"),
    computed from the counts each update consumed, and every real token was counted k times;
  * `trainer.save_model` + `PeftModel.from_pretrained` on a fresh base gives bit-identical logits
    (torch.equal: same fp32 weights, same kernels, so any difference means a tensor was lost),
    and adapter_config.json names our method;
  * "step" cadence without the callback: FlyLoRA's existing stale-bias warning reaches the user.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from flylora.cli import _quiet_known_deprecations

_quiet_known_deprecations()  # for importing trl here; the autouse fixture below for each test

trl = pytest.importorskip("trl")

import flylora  # noqa: E402
from flylora import balance  # noqa: E402
from flylora.tuners.flylora import FlyLoraLayer  # noqa: E402
from pipeline_child import tiny_model_dir  # noqa: E402

STEPS, BATCH, ACCUM = 3, 2, 2
N_ROWS = STEPS * BATCH * ACCUM  # one epoch: every row is trained on exactly once
LR = 1e-2  # large, so every trained tensor moves visibly in 3 steps
# FlyLoRA's stale-bias warning threshold, lowered from 1000: above one optimizer step's training
# forwards (2 micro-batches, each also recomputed by gradient checkpointing: 2-4), and no more than
# the run's 6 micro-batches (6-12), so it fires without RoutingBiasCallback and never with it
WARN_AFTER = 6


@pytest.fixture(autouse=True)
def _quiet():
    _quiet_known_deprecations()  # transformers 5 renames reached through TRL (pytest resets filters per test)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("trl-base"))


def _base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir)


def _tokenizer(base_dir):
    from flylora.models import load_tokenizer

    return load_tokenizer(base_dir, padding_side="right")


def _dataset(kind: str):
    from datasets import Dataset

    words = "the quick brown fox jumps over the lazy dog while a cat sleeps".split()
    rows = [" ".join(words[: 3 + (i * 5) % 10]) for i in range(N_ROWS)]  # lengths differ: padding
    if kind == "text":
        return Dataset.from_dict({"text": rows})
    return Dataset.from_dict({"prompt": [f"Q{i}: {r}?" for i, r in enumerate(rows)],
                              "completion": [f" A: {r[::-1]}" for r in rows]})


def _fixed_batch(base_dir):
    tok = _tokenizer(base_dir)
    return dict(tok(["the lazy dog sleeps", "a quick brown fox jumps over it"], return_tensors="pt", padding=True))


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch).logits


def _sft_config(tmp_path, **kw):
    return trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, learning_rate=LR, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, **kw,
    )  # fmt: skip


def _riemannian(model):
    return flylora.optim.RiemannianAdamW.from_model(model, lr=LR, gate_lr=LR / 10, gate_max_norm=1.0)


class RiemannianSFTTrainer(trl.SFTTrainer):
    """What flylora's own Trainer does (pipeline/trainer.py): build the Riemannian optimizer from
    the PEFT model the trainer created, so TRL can still call get_peft_model itself."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = _riemannian(self.model)
        return self.optimizer


# name -> (config kwargs, dataset kind, how the optimizer is given)
CASES = {
    "flylora-micro_batch": (flylora.FlyLoraConfig, dict(r=8, k=2, lora_alpha=16, bias_update_rate=0.01,
                                                        bias_update_every="micro_batch"), "text", None),
    "flylora-step+callback": (flylora.FlyLoraConfig, dict(r=8, k=2, lora_alpha=16, bias_update_rate=0.01,
                                                          task_type="CAUSAL_LM"), "text", None),
    "toplora": (flylora.TopLoraConfig, dict(r=4, lora_dropout=0.0, task_type="CAUSAL_LM"), "prompt-completion", None),
    # TRL makes the PEFT model; the optimizer is built from it in create_optimizer (as flylora train does)
    "moelora-riemannian": (flylora.MoeLoraConfig, dict(num_experts=4, expert_r=2, top_k=2, lora_alpha=4,
                                                       lora_dropout=0.0, task_type="CAUSAL_LM"), "text", "subclass"),
    # the PEFT model made first, the optimizer passed as `optimizers=(opt, None)` (no peft_config then)
    "moelora-riemannian-prewrapped": (flylora.MoeLoraConfig, dict(num_experts=4, expert_r=2, top_k=2, lora_alpha=4,
                                                                  lora_dropout=0.0, task_type="CAUSAL_LM"),
                                      "text", "optimizers"),
}


@pytest.fixture
def bias_updates(monkeypatch):
    """Every call of update_routing_bias (the callback's and the micro-batch hook's), with the
    counts it consumed, so the expected d can be rebuilt exactly."""
    calls = []
    real = balance.update_routing_bias

    def spy(model, cadence=None):
        consumed = {}
        for _, layer in balance.routed_layers(model):
            for name, c in layer.pending_counts.items():
                if cadence is None or layer.bias_update_every[name] == cadence:
                    consumed[(id(layer), name)] = c.clone()
        n = real(model, cadence)
        calls.append((cadence, consumed, n))
        return n

    monkeypatch.setattr(balance, "update_routing_bias", spy)
    return calls


def _adapter_names(model) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    attrs = {a for m in model.modules() if isinstance(m, BaseTunerLayer) for a in m.adapter_layer_names}
    return {n for n, _ in model.named_parameters() if any(f".{a}." in n for a in attrs)}


@pytest.mark.parametrize("case", list(CASES))
def test_sft_trainer_trains_saves_and_reloads(case, base_dir, tmp_path, bias_updates, monkeypatch):
    from peft import PeftModel, get_peft_model

    monkeypatch.setattr(FlyLoraLayer, "WARN_AFTER_FORWARDS", WARN_AFTER)
    config_cls, kwargs, data, opt_via = CASES[case]
    config = config_cls(**kwargs)
    ds, tok, batch = _dataset(data), _tokenizer(base_dir), _fixed_batch(base_dir)
    base_logits = _logits(_base(base_dir), batch)
    trainer_kw = dict(args=_sft_config(tmp_path), train_dataset=ds, processing_class=tok)
    if case == "flylora-step+callback":
        trainer_kw["callbacks"] = [flylora.RoutingBiasCallback()]
    if opt_via == "optimizers":
        model = get_peft_model(_base(base_dir), config)
        trainer = trl.SFTTrainer(model=model, optimizers=(_riemannian(model), None), **trainer_kw)
    else:
        cls = RiemannianSFTTrainer if opt_via == "subclass" else trl.SFTTrainer
        trainer = cls(model=_base(base_dir), peft_config=config, **trainer_kw)
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == config.method_name

    adapter = _adapter_names(model)
    assert adapter and {n for n, p in model.named_parameters() if p.requires_grad} == adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:  # the stale-bias warning must not come
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "has not been updated" in str(w.message)]

    after = dict(model.named_parameters())
    unchanged = sorted(n for n in adapter if torch.equal(after[n], before[n]))
    assert not unchanged, f"adapter tensors that did not train: {unchanged}"
    moved = sorted(n for n in before if n not in adapter and not torch.equal(after[n], before[n]))
    assert not moved, f"base weights changed: {moved}"

    if opt_via is not None:  # the preconditioned optimizer was the one that stepped, over every expert pair
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        assert isinstance(opt, flylora.optim.RiemannianAdamW)
        pairs, _ = flylora.optim.find_pairs(model)
        assert sum(len(g["pairs"]) for g in opt.param_groups) == len(pairs) > 0
        assert len(opt.state) == len(adapter)
    if config_cls is flylora.FlyLoraConfig:
        _check_routing_bias(model, trainer, config, bias_updates)
    else:
        assert not bias_updates or all(n == 0 for _, _, n in bias_updates)

    # accelerate left model.forward wrapped in TRL's default bf16 autocast (SFTConfig bf16=True):
    # unwrap it, so the trained fp32 weights are compared, not a bf16 forward of them
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    trained = _logits(model, batch)
    assert (trained - base_logits).abs().max() > 1e-3  # the adapter matters: the reload check is not vacuous
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == config.method_name
    reloaded = PeftModel.from_pretrained(_base(base_dir), str(out))
    assert torch.equal(_logits(reloaded, batch), trained)


def _check_routing_bias(model, trainer, config, calls) -> None:
    layers = [m for _, m in balance.routed_layers(model)]
    cadence = config.bias_update_every
    # one update per optimizer step ("step", by RoutingBiasCallback) or per micro-batch ("micro_batch")
    expected_calls = STEPS if cadence == "step" else STEPS * ACCUM
    assert [c for c, _, _ in calls] == [cadence] * expected_calls
    assert [n for _, _, n in calls] == [len(layers)] * expected_calls  # every layer had counts each time
    u = config.bias_update_rate
    real_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])  # padding is not counted
    for layer in layers:
        d = layer.flylora_bias["default"]
        expected = torch.zeros_like(d)
        for _, consumed, _ in calls:
            c = consumed[(id(layer), "default")]
            expected += torch.sign(c.mean() - c) * u  # paper Eq. 9
        assert torch.equal(d, expected), layer.layer_key
        # each real token of each micro-batch was counted k times, once (not again in checkpoint recompute)
        assert layer.load_totals["default"].sum().item() == config.k * real_tokens
    assert any(layer.flylora_bias["default"].abs().sum() > 0 for layer in layers)


def test_step_cadence_without_callback_warns(base_dir, tmp_path, monkeypatch):
    """FlyLoRA's own mechanism: a layer whose bias has gone WARN_AFTER_FORWARDS training forwards
    without an update warns, naming RoutingBiasCallback (the test above: no warning with it)."""
    monkeypatch.setattr(FlyLoraLayer, "WARN_AFTER_FORWARDS", WARN_AFTER)
    config = flylora.FlyLoraConfig(r=8, k=2, lora_alpha=16, bias_update_rate=0.01, task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=_base(base_dir), args=_sft_config(tmp_path), train_dataset=_dataset("text"),
                             processing_class=_tokenizer(base_dir), peft_config=config)
    with pytest.warns(UserWarning, match=r"has not been updated .*RoutingBiasCallback"):
        trainer.train()
    assert all(m.flylora_bias["default"].abs().sum() == 0 for _, m in balance.routed_layers(trainer.model))
