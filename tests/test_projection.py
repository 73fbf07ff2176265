"""FlyLoRA's frozen A is the same wherever the adapter runs (flylora.tuners.projection):
ranks agree on a fresh seed, the seed travels with the state dict, and a fingerprint of A saved in
adapter_config.json is checked when A is regenerated. Plus d stays fp32 through casts and
FlyLoraLinear's α defaults to 2r."""
from __future__ import annotations

import json

import pytest
import torch
from peft import (
    PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict,
)  # fmt: skip
from torch import nn

import flylora
from flylora.layers.flylora import FlyLoraLinear
from flylora.tuners.projection import ProjectionMismatchError
from helpers import make_inputs, make_model, perturb, run_child, tuner_layers

KW = dict(r=8, k=2)  # projection_seed unset: a fresh seed per config


def trained_adapter(**cfg):
    model = get_peft_model(make_model("llama"), flylora.FlyLoraConfig(**KW, **cfg)).eval()
    perturb(model)  # B ≠ 0, so a different A changes the output
    return model


def logits(model):
    with torch.no_grad():
        return model(**make_inputs("llama")).logits


def a_of(model):
    return [layer.flylora_A["default"].clone() for layer in tuner_layers(model)]


# ---------------------------------------------------------------- 1. ranks agree


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")
def test_ranks_agree_on_a_fresh_seed_under_ddp_and_fsdp(tmp_path):
    """A user's script, seed unset, 2 gloo ranks: created before or after init_process_group,
    trained under DDP(broadcast_buffers=False) or FSDP2 on CPU, both ranks end with rank 0's
    seed, identical A, B and d, equal to one process on the whole batch with that seed."""
    import projection_child as child

    run_child("projection_child.py", "dist", str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    for s in child.SCENARIOS:
        a, b = r0[s], r1[s]
        assert a["seed"] == b["seed"] and a["A"] == b["A"], s
        if s.endswith("before_init"):  # each rank drew its own seed; the first training forward agreed
            assert a["A_created"] != b["A_created"] and a["A"] == a["A_created"], s
        else:  # broadcast at creation: one A from the start
            assert a["A_created"] == b["A_created"], s
        ref = child.reference(a["seed"])
        assert ref["A"] == a["A"], s
        assert a["state"].keys() == b["state"].keys() == ref["state"].keys()
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (s, k)
            torch.testing.assert_close(a["state"][k], ref["state"][k], atol=1e-6, rtol=1e-5)
        assert any(float(v.abs().sum()) > 0 for k, v in a["state"].items() if "flylora_B" in k)


# ---------------------------------------------------------------- 2. the seed travels with the state dict


def test_state_dict_round_trip_onto_a_fresh_config_gives_the_same_model():
    """get_peft_model(FlyLoraConfig(**same_kwargs)) + set_peft_model_state_dict, and
    inject_adapter_in_model + load_state_dict(strict=True): the fresh config drew another seed, the
    state dict's flylora_seed wins and A is rebuilt, so the logits are bit-identical."""
    src = trained_adapter()
    want, saved = logits(src), get_peft_model_state_dict(src)
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"flylora_B", "flylora_bias", "flylora_seed"}

    dst = get_peft_model(make_model("llama"), flylora.FlyLoraConfig(**KW)).eval()
    assert dst.peft_config["default"].projection_seed != src.peft_config["default"].projection_seed
    res = set_peft_model_state_dict(dst, saved)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "flylora_" in k]
    assert torch.equal(logits(dst), want)
    for a, b in zip(a_of(src), a_of(dst)):
        assert torch.equal(a, b)

    base = inject_adapter_in_model(flylora.FlyLoraConfig(**KW), make_model("llama").eval())
    full = dict(base.state_dict())  # base weights + the adapter's keys, then the saved adapter
    full.update({k.removeprefix("base_model.model.") + ".default": v for k, v in saved.items()})
    base.load_state_dict(full, strict=True)
    assert torch.equal(logits(base), want)


def test_a_file_without_the_seed_keeps_the_config_seed():
    """Adapter files written before flylora_seed existed: no missing key reported, and A is the
    config's (the old behaviour), so a matching config still reproduces the model."""
    src = trained_adapter()
    old = {k: v for k, v in get_peft_model_state_dict(src).items() if "flylora_seed" not in k}
    cfg = flylora.FlyLoraConfig(**KW, projection_seed=src.peft_config["default"].projection_seed)
    dst = get_peft_model(make_model("llama"), cfg).eval()
    res = set_peft_model_state_dict(dst, old)
    assert not [k for k in res.missing_keys if "flylora_" in k]
    assert torch.equal(logits(dst), logits(src))


def test_saved_sparse_a_wins_over_a_loaded_seed():
    """save_projection=True: the file's sparse A is loaded as is, whatever seed either side has;
    the layer notes the file's seed."""
    src = trained_adapter(save_projection=True)
    dst = get_peft_model(make_model("llama"), flylora.FlyLoraConfig(**KW, save_projection=True)).eval()
    set_peft_model_state_dict(dst, get_peft_model_state_dict(src))
    assert torch.equal(logits(dst), logits(src))
    seed = src.peft_config["default"].projection_seed
    assert all(layer.a_seed["default"] == seed for layer in tuner_layers(dst))


# ---------------------------------------------------------------- 3. the fingerprint


def test_fingerprint_is_saved_and_a_regenerated_from_an_edited_seed_is_refused(tmp_path):
    """adapter_config.json holds sha256 of A; it reloads (same logits); a config whose seed or
    fingerprint was edited is refused with one line naming save_projection=True."""
    src = trained_adapter()
    src.save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["projection_fingerprint"].startswith("sha256:") and len(cfg["projection_fingerprint"]) == 71
    assert cfg["projection_seed"] == src.peft_config["default"].projection_seed
    assert torch.equal(logits(PeftModel.from_pretrained(make_model("llama"), tmp_path)), logits(src))

    for edit in ({"projection_seed": cfg["projection_seed"] + 1}, {"projection_fingerprint": "sha256:" + "0" * 64}):
        cfg_path.write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ProjectionMismatchError, match=r"re-save the adapter with save_projection=True") as e:
            flylora.load_adapter(make_model("llama"), str(tmp_path))
        assert "\n" not in str(e.value) and isinstance(e.value, flylora.AdapterLoadError)

    # with save_projection=True the file holds A: nothing to regenerate, nothing to check
    src2 = trained_adapter(save_projection=True)
    src2.save_pretrained(tmp_path / "sp")
    p2 = tmp_path / "sp" / "adapter_config.json"
    p2.write_text(json.dumps({**json.loads(p2.read_text()), "projection_fingerprint": "sha256:" + "0" * 64}))
    assert torch.equal(logits(flylora.load_adapter(make_model("llama"), str(tmp_path / "sp"))), logits(src2))


def test_reusing_a_saved_config_object_on_another_model_is_not_refused(tmp_path):
    """save_pretrained writes the fingerprint into the live config; that config object used again
    on a model of other shapes describes no saved A there, so it is not checked against it."""
    cfg = flylora.FlyLoraConfig(**KW, target_modules=["q_proj"])
    get_peft_model(make_model("llama"), cfg).save_pretrained(tmp_path)
    assert cfg.projection_fingerprint is not None
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    get_peft_model(LlamaForCausalLM(tiny_llama_config(hidden_size=64)), cfg)


@pytest.mark.slow
def test_another_cpu_kernel_draws_another_a_and_is_refused(tmp_path, monkeypatch):
    """torch's CPU randn differs in the last bits between its AVX2/AVX512 and DEFAULT kernels
    (aarch64 runs the latter): an adapter saved here, loaded in a process forced onto the DEFAULT
    kernel, regenerates another A, and the fingerprint check refuses it."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU already runs torch's DEFAULT kernels: no other kernel to compare with")
    trained_adapter().save_pretrained(tmp_path / "seed_only")
    trained_adapter(save_projection=True).save_pretrained(tmp_path / "self_contained")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # the child process runs torch's DEFAULT kernels
    out = run_child("projection_child.py", "load", str(tmp_path / "seed_only"), str(tmp_path / "self_contained"))
    seed_only, self_contained = out.stdout.strip().splitlines()[-2:]
    assert seed_only.startswith("ProjectionMismatchError: adapter 'default'") and "CPU kernels DEFAULT" in seed_only
    assert self_contained == "OK"


# ---------------------------------------------------------------- 4. small correctness items


def test_routing_bias_and_sparse_values_stay_fp32_through_half_and_bf16():
    """model.half() / .to(bfloat16) cast the base and A, never d (a 1e-3 step is lost in fp16
    once |d| ≥ 4) nor A's stored sparse values (saved A must reload bit-identically)."""
    model = get_peft_model(make_model("llama"), flylora.FlyLoraConfig(**KW, save_projection=True))
    vals = [layer.flylora_A_vals["default"].clone() for layer in tuner_layers(model)]
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        cast(model)
        for layer, v in zip(tuner_layers(model), vals):
            assert layer.flylora_bias["default"].dtype == torch.float32
            assert torch.equal(layer.flylora_A_vals["default"], v)
            assert layer.flylora_seed["default"].dtype == torch.int64
    assert tuner_layers(model)[0].flylora_A["default"].dtype == torch.float32
    solo = FlyLoraLinear(nn.Linear(16, 4), r=4, k=2).half()
    assert solo.routing_bias.dtype == solo.counts.dtype == torch.float32 and solo.A.dtype == torch.float16


def test_flylora_linear_alpha_defaults_to_2r():
    """α = 2r (the paper's α/r = 2), whatever r; an explicit α is kept."""
    lin = nn.Linear(16, 4)
    assert [FlyLoraLinear(lin, r=r, k=2).scale for r in (4, 8, 16)] == [2.0, 2.0, 2.0]
    assert FlyLoraLinear(lin, r=4, k=2, alpha=6.0).scale == 1.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"projection_seed": 2**63}, r"projection_seed=9223372036854775808 is not allowed: it must be an int in"),
        ({"projection_seed": "3"}, r"projection_seed='3' is not allowed"),
        ({"projection_fingerprint": "abc"}, r"projection_fingerprint='abc' is not allowed: it must be 'sha256:'"),
    ],
)
def test_projection_config_errors_are_one_line(kwargs, match):
    for cls in (flylora.FlyLoraConfig, flylora.LoraFaConfig):
        with pytest.raises(ValueError, match=match) as e:
            cls(r=8, **kwargs)
        assert "\n" not in str(e.value)
