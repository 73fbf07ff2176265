"""`flylora train`: recipe validation, a YAML -> run -> run.json round trip, every method through
the Trainer, kill-and-resume reproducing an uninterrupted run, and 2-process DDP (gloo, torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline_child import HERE, tiny_model_dir, tiny_recipe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _adapter_tensors(run_dir) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------ recipe validation
@pytest.mark.parametrize("overrides, message", [
    (["model.foo=1"], "unknown key recipe.model.foo (allowed: compute_dtype, double_quant, dtype, name_or_path, quantization)"),
    (["train.lr=abc"], "recipe.train.lr: expected float, got 'abc'"),
    (["train.seed=true"], "recipe.train.seed: expected int, got True"),
    (["data.limit=1.5"], "recipe.data.limit: expected int or null, got 1.5"),
    (["train.precision=fp8"], "recipe.train.precision: 'fp8' is not allowed (allowed: fp32, bf16, fp16)"),
    (["method.config.rank=4"], "unknown key recipe.method.config.rank for method 'flylora'"),
    (["method.config.k=eight"], "recipe.method.config.k: expected int, got 'eight'"),
    (["method.name=qlora"], "recipe.method.name: 'qlora' is not allowed"),
    (["train.gate_lr=1e-3"], "recipe.train.gate_lr: only used by the Riemannian optimizers"),
    (["train.lr"], "override 'train.lr': expected key.path=value"),
])
def test_malformed_recipe_fails_with_one_line_naming_the_key(overrides, message):
    from flylora.pipeline.recipe import load_recipe

    with pytest.raises(ValueError) as e:
        load_recipe(os.path.join(HERE, "..", "recipes", "cpu", "flylora_smollm2.yaml"), overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_malformed_yaml_file_through_the_cli(tmp_path, capsys):
    from flylora.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  lr: abc\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flylora train: error: recipe.train.lr: expected float, got 'abc'"]
    bad.write_text("name: x\nmodel:\n  foo: 1\n")
    assert main(["train", str(bad)]) == 2
    assert "unknown key recipe.model.foo (allowed: compute_dtype, double_quant, dtype, name_or_path, quantization)" in capsys.readouterr().err


def test_overrides_are_yaml_scalars_and_floats_follow_yaml_1_2():
    from flylora.pipeline.recipe import apply_overrides, load_recipe, parse_override

    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)  # PyYAML alone gives '1e-3'
    assert parse_override("data.path=null") == (["data", "path"], None)
    assert parse_override("method.config.target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]
    r = load_recipe({"name": "x", "train": {"lr": 1}}, ["train.epochs=2", "method.config={r: 16, k: 4}"])
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float) and r.train.epochs == 2.0
    assert r.method.config == {"r": 16, "k": 4}
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}


def test_projection_seed_is_separate_from_the_training_seed():
    from flylora.pipeline.recipe import load_recipe
    from flylora.pipeline.train import derive_seed, peft_config_kwargs

    def seed(**kw):
        return peft_config_kwargs(load_recipe({"name": "x", **kw}))["projection_seed"]

    base = seed(data={"task": "mmlu"})
    assert base == derive_seed("projection", 0, "mmlu") == seed(data={"task": "mmlu"})  # reproducible
    assert seed(data={"task": "gsm8k"}) != base  # independent A per task
    assert seed(data={"task": "mmlu"}, train={"seed": 1}) != base
    assert seed(method={"name": "flylora", "config": {"projection_seed": 5}}) == 5  # explicit wins
    lora = peft_config_kwargs(load_recipe({"name": "x", "method": {"name": "lora", "config": {"r": 4}}}))
    assert "projection_seed" not in lora and len(lora["target_modules"]) == 7


# ------------------------------------------------------------------------------ training
def test_recipe_round_trip_yaml_to_run_json(model_dir, tmp_path, capsys):
    from flylora.accounting import count_parameters
    from flylora.cli import main
    from flylora.loading import load_adapter
    from flylora.models import load_model
    from flylora.pipeline.train import derive_seed

    run_dir = tmp_path / "run"
    recipe = tiny_recipe(model_dir, str(run_dir), train={"max_steps": 3, "gradient_accumulation": 2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "train.lr=2e-2"]) == 0

    info = json.loads((run_dir / "run.json").read_text())
    assert info["recipe"]["train"]["lr"] == 2e-2 and info["recipe"]["model"]["name_or_path"] == model_dir
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text()) == info["recipe"]
    assert info["train"]["global_step"] == 3 and info["data"]["split"] == "carved-train"
    assert info["data"]["examples"] == 24 and "carved-train" in info["data"]["source"]
    assert info["seeds"] == {"train": 0, "data": None, "projection": derive_seed("projection", 0, "glue:sst2"),
                             "carve": 0}
    assert all(k in info["versions"] for k in ("torch", "transformers", "peft", "flylora"))
    losses = [h["loss"] for h in info["train"]["log_history"] if "loss" in h]
    assert len(losses) == 3 and info["train"]["final_loss"] == losses[-1]
    assert info["distributed"]["identical"] and info["wall_s"] > 0
    assert info["routing"]["layers"] == 14  # 2 blocks × 7 projections routed tokens

    # 2 layers × (q 32 + k 16 + v 16 + o 32 + gate 64 + up 64 + down 32) = 512 output rows, r = 8, k = 2
    assert info["parameters"]["trainable"] == 512 * 8 and info["parameters"]["activated"] == 512 * 2
    assert info["parameters"]["stored"] == 512 * 8 + 14 * 8 + 14  # B, the routing bias d and the int64 projection seed of 14 layers
    model = load_adapter(load_model(model_dir), str(run_dir / "adapter"))
    assert count_parameters(model)["stored"] == info["parameters"]["stored"]
    tensors = _adapter_tensors(run_dir)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("flylora_B"))  # it trained
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("flylora_bias"))  # d moved
    assert not list(tmp_path.glob(".adapter*"))  # no temp folder left by the atomic save

    # a finished run is not silently retrained
    assert main(["train", str(path)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_tensorboard_true_without_the_package_is_one_line(model_dir, tmp_path):
    from flylora.pipeline.train import tensorboard_available, train

    recipe = tiny_recipe(model_dir, str(tmp_path / "tb"), train={"max_steps": 1})
    recipe["output"]["tensorboard"] = True
    if tensorboard_available():
        run_dir = train(recipe)
        assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").rglob("*"))
    else:
        with pytest.raises(ValueError, match=r"^recipe.output.tensorboard: true needs the tensorboard package"):
            train(recipe)


@pytest.mark.parametrize("method, config, train_kw", [
    ("lora", {"r": 4, "lora_alpha": 8}, {"gradient_checkpointing": True, "gradient_accumulation": 2}),
    ("moelora", {"num_experts": 4, "expert_r": 2, "top_k": 2, "aux_loss_coef": 0.01},
     {"optimizer": "riemannian_adamw", "gate_lr": 1e-4, "gate_max_norm": 1.0, "lr_scheduler": "polynomial",
      "lr_scheduler_kwargs": {"lr_end": 1e-3, "power": 1.0}}),
    ("flylora", {"r": 8, "k": 2}, {"optimizer": "riemannian_sgd", "precision": "bf16",
                                   "gradient_checkpointing": True}),
    ("adalora", {"init_r": 4, "target_r": 2, "lora_alpha": 8}, {}),
    ("split_lora", {"r": 8, "num_experts": 4}, {}),
    ("hydralora", {"r": 4}, {}),
    ("toplora", {"r": 4}, {}),
    ("lora_fa", {"r": 4}, {}),
])
def test_every_method_trains_through_the_trainer(model_dir, tmp_path, method, config, train_kw):
    from flylora.pipeline.train import train

    recipe = tiny_recipe(model_dir, str(tmp_path / method), method=method, train={"max_steps": 2, **train_kw})
    recipe["method"]["config"] = config
    info = json.loads((train(recipe) / "run.json").read_text())
    assert info["method"] == method and info["train"]["global_step"] == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in info["train"]["log_history"] if "loss" in h)
    assert info["parameters"]["trainable"] > 0
    lrs = [h["learning_rate"] for h in info["train"]["log_history"] if "learning_rate" in h]
    assert lrs[0] == pytest.approx(1e-2)  # the recipe's lr reached the (Riemannian or HF) optimizer


def test_kill_and_resume_reaches_the_uninterrupted_adapter(model_dir, tmp_path):
    """Run A: 6 steps straight. Run B: killed (os._exit) right after the step-3 checkpoint, then
    `resume: auto` continues. Dropout, bf16 autocast, gradient accumulation and the routing bias
    are all in play; the adapters must agree bit for bit (tolerance 1e-6)."""
    from flylora.pipeline.train import train

    kw = {"max_steps": 6, "save_steps": 3, "precision": "bf16", "gradient_accumulation": 2}
    config = {"r": 8, "k": 2, "lora_alpha": 16, "bias_update_rate": 0.01, "lora_dropout": 0.1}
    a = tiny_recipe(model_dir, str(tmp_path / "a"), train=kw)
    b = tiny_recipe(model_dir, str(tmp_path / "b"), train=kw)
    a["method"]["config"] = b["method"]["config"] = config
    run_a = train(a)

    spec = tmp_path / "b.json"
    spec.write_text(json.dumps(b))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "pipeline_child.py"), "train-and-die", str(spec), "3"],
                          capture_output=True, text=True, timeout=240, env=env, cwd=HERE)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert not (tmp_path / "b" / "adapter").exists() and (tmp_path / "b" / "checkpoints" / "checkpoint-3").is_dir()

    changed = json.loads(json.dumps(b))
    changed["train"]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"cannot resume .*recipe.train.lr was 0.01, the recipe now says 0.5"):
        train(changed)

    run_b = train(b)
    info = json.loads((run_b / "run.json").read_text())
    assert info["train"]["resumed_from"].endswith("checkpoint-3") and info["train"]["global_step"] == 6
    ta, tb = _adapter_tensors(run_a), _adapter_tensors(run_b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=0, atol=1e-6), k
    assert any(t.abs().sum() > 0 for k, t in tb.items() if k.endswith("flylora_bias"))


@pytest.mark.slow
def test_two_process_gloo_ddp_ends_with_identical_adapters(model_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    recipe = tiny_recipe(model_dir, str(run_dir), train={"max_steps": 3, "micro_batch_size": 2})
    recipe["method"]["config"]["lora_dropout"] = 0.1  # per-rank RNG streams must not matter for sync
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: the agent binds its own free rendezvous port (no pick-then-release race)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "flylora", "train", str(path)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    hashes = info["distributed"]["adapter_sha256_per_rank"]
    assert info["distributed"]["world_size"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    # 24 examples / (2 per rank × 2 ranks) = 6 steps per epoch: each rank saw its own half
    assert info["train"]["epoch"] == pytest.approx(0.5)
    tensors = _adapter_tensors(run_dir)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("flylora_bias"))
