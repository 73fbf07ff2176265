"""The FlyLoRA paper's baselines against their equations, and LoRA-FA ≡ FlyLoRA(k=r, sparsity=1)."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import flylora
from flylora.layers.flylora import FlyLoraLinear, flylora_delta
from flylora.layers.lora_fa import LoraFaLinear, lora_fa_delta
from flylora.layers.split_lora import split_gate
from helpers import make_inputs, make_model, output_of, perturb, tuner_layers


def one_layer(config):
    model = get_peft_model(make_model("mlp"), config).eval()
    perturb(model)
    return model, tuner_layers(model)[0]


# ---- Split-LoRA ----------------------------------------------------------------------------------
def test_split_gate_is_sigmoid_of_the_topk_logits():
    x, router = torch.randn(9, 6), torch.randn(5, 6)
    G = split_gate(x, router, top_k=2)
    logits = x @ router.t()
    top = logits.topk(2, dim=-1).indices
    assert torch.equal((G != 0).sum(-1), torch.full((9,), 2))
    torch.testing.assert_close(G.gather(-1, top), torch.sigmoid(logits.gather(-1, top)))


def test_split_lora_equals_the_per_expert_equation():
    """f(x) = W0x + b + (α/r) Σ_i G(x)_i B_i A_i x, experts of rank r/N."""
    model, layer = one_layer(flylora.SplitLoraConfig(r=8, num_experts=4, top_k=2, lora_alpha=4, target_modules=["lin0"]))
    A, B, Wg = (layer.splitlora_A["default"], layer.splitlora_B["default"], layer.splitlora_router["default"])
    x = torch.randn(7, 10)
    with torch.no_grad():
        G = split_gate(x, Wg, 2)
        want = layer.base_layer(x) + sum(
            (4 / 8) * G[:, i : i + 1] * (x @ A[2 * i : 2 * i + 2].t() @ B[:, 2 * i : 2 * i + 2].t()) for i in range(4)
        )
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_split_lora_defaults_and_validation():
    cfg = flylora.SplitLoraConfig()
    assert (cfg.r, cfg.num_experts, cfg.top_k, cfg.lora_alpha, cfg.lora_dropout) == (32, 4, 1, 64, 0.0)
    for bad, word in (({"r": 30}, "multiple"), ({"top_k": 5}, "top_k"), ({"num_experts": 0}, "num_experts")):
        with pytest.raises(ValueError, match=word) as e:
            flylora.SplitLoraConfig(**bad)
        assert "\n" not in str(e.value)


# ---- HydraLoRA -----------------------------------------------------------------------------------
def test_hydralora_equals_the_per_head_equation():
    """f(x) = W0x + b + (α/r) Σ_i softmax(W_r x)_i B_i A x with one shared A."""
    model, layer = one_layer(flylora.HydraLoraConfig(r=3, num_heads=4, lora_alpha=6, target_modules=["lin0"]))
    A, B, Wr = (layer.hydralora_A["default"], layer.hydralora_B["default"], layer.hydralora_router["default"])
    assert A.shape == (3, 10) and B.shape == (20, 12)
    x = torch.randn(7, 10)
    with torch.no_grad():
        w = torch.softmax(x @ Wr.t(), -1)
        want = layer.base_layer(x) + sum(2.0 * w[:, i : i + 1] * (x @ A.t() @ B[:, 3 * i : 3 * i + 3].t()) for i in range(4))
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_hydralora_with_one_head_is_lora_and_merges():
    model, layer = one_layer(flylora.HydraLoraConfig(r=3, num_heads=1, target_modules=["lin0", "lin1"]))
    inputs = make_inputs("mlp")
    with torch.no_grad():
        ref = output_of(model, inputs)
        x = torch.randn(4, 10)
        lora = layer.base_layer(x) + (16 / 3) * x @ layer.hydralora_A["default"].t() @ layer.hydralora_B["default"].t()
        torch.testing.assert_close(layer(x), lora, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(output_of(merged, inputs), ref, atol=1e-5, rtol=1e-5)


def test_hydralora_defaults_and_validation():
    cfg = flylora.HydraLoraConfig()
    assert (cfg.r, cfg.num_heads, cfg.lora_alpha) == (8, 3, 16)
    with pytest.raises(ValueError, match="num_heads"):
        flylora.HydraLoraConfig(num_heads=0)
    model = get_peft_model(make_model("mlp"), flylora.HydraLoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


# ---- LoRA-FA ≡ FlyLoRA(k = r, sparsity = 1) --------------------------------------------------------
@pytest.mark.parametrize("fly_sparsity", [1.0, None])  # None = k/r = 1
def test_lora_fa_is_flylora_with_every_expert_active_bit_for_bit(fly_sparsity):
    """Same seed ⇒ identical A, outputs, and gradients (to B and to the layer input)."""
    results = []
    for cfg in (
        flylora.LoraFaConfig(r=4, lora_alpha=8, projection_seed=11, target_modules=["lin0", "lin1"]),
        flylora.FlyLoraConfig(r=4, k=4, sparsity=fly_sparsity, lora_alpha=8, projection_seed=11, target_modules=["lin0", "lin1"]),
    ):
        model = get_peft_model(make_model("mlp"), cfg).train()
        perturb(model, std=0.3)
        X = make_inputs("mlp")["X"].requires_grad_()
        out = model(X=X)
        out.pow(2).sum().backward()
        A = {n: b.clone() for n, b in model.named_buffers() if ".flylora_A." in n}
        gB = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), X.grad.clone(), A, gB))
    (o1, gx1, A1, gB1), (o2, gx2, A2, gB2) = results
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
    assert A1.keys() == A2.keys() and all(torch.equal(A1[k], A2[k]) for k in A1)
    assert all((A1[k] != 0).all() for k in A1)  # dense A: sparsity 1
    assert gB1.keys() == gB2.keys() and all(torch.equal(gB1[k], gB2[k]) for k in gB1)


def test_lora_fa_standalone_and_function_share_flylora_code():
    base = nn.Linear(12, 5)
    fa, fly = LoraFaLinear(base, r=3, alpha=6.0, seed=5), FlyLoraLinear(base, r=3, k=3, alpha=6.0, sparsity=1.0, seed=5)
    with torch.no_grad():
        fa.B.normal_()
        fly.B.copy_(fa.B)
    x = torch.randn(2, 4, 12)
    assert torch.equal(fa.A, fly.A) and torch.equal(fa(x), fly(x))
    want = flylora_delta(x, fly.A, fly.B, torch.zeros(3), 3, 2.0)[0]
    assert torch.equal(lora_fa_delta(x, fa.A, fa.B, 2.0), want)
    torch.testing.assert_close(want, 2.0 * x @ fa.A.t() @ fa.B.t())  # the LoRA-FA equation


def test_lora_fa_config_trains_b_only_and_merges():
    cfg = flylora.LoraFaConfig(r=4)
    assert cfg.k == 4 and "k" not in cfg.to_dict() and cfg.to_dict()["peft_type"] == "LORA_FA"
    assert (flylora.LoraFaConfig().r, flylora.LoraFaConfig().lora_alpha) == (32, 64)
    model = get_peft_model(make_model("mlp"), flylora.LoraFaConfig(r=4, target_modules=["lin0"]))
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"flylora_B"}
    with pytest.raises(ValueError, match="projection_seed"):
        flylora.LoraFaConfig(projection_seed="7")
