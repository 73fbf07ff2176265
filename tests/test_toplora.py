"""TopLoRA against the equation written out by hand:

    h = W0 x + b0 + (α/r) · B[(A · dropout(x)) ⊙ exp(γ ⊙ u / sqrt(mean_j u_j² + ε))],   u = x Θ
"""
from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

import flylora
from flylora.layers.toplora import TopLoraLinear, toplora_delta
from flylora.tuners.toplora import TopLoraLayer
from helpers import make_model, perturb, tuner_layers


def by_hand(x, W0, b0, A, B, theta, gamma, scale, eps, x_for_A=None, x_for_sigma=None):
    """The equation in plain tensor ops (no F.rms_norm), in float64. x_for_A / x_for_sigma replace
    x in one branch (default: x)."""
    x, W0, b0, A, B, theta, gamma = (t.double() for t in (x, W0, b0, A, B, theta, gamma))
    xa = x if x_for_A is None else x_for_A.double()
    xs = x if x_for_sigma is None else x_for_sigma.double()
    u = xs @ theta  # (..., r)
    lam = torch.exp(gamma * u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + eps))
    return x @ W0.t() + b0 + scale * ((xa @ A.t()) * lam) @ B.t()


def tensors(layer: TopLoraLayer, name="default"):
    return (
        layer.base_layer.weight, layer.base_layer.bias, layer.toplora_A[name], layer.toplora_B[name],
        layer.toplora_theta[name], layer.toplora_gamma[name],
    )  # fmt: skip


@pytest.mark.parametrize("rms_eps", [None, 1e-6, 0.5])
def test_peft_layer_equals_the_equation(rms_eps):
    """ε = None means torch.finfo(fp32).eps; tiny inputs make ε matter, so a wrong ε would show."""
    model = get_peft_model(make_model("mlp"), flylora.TopLoraConfig(r=4, lora_alpha=6, rms_eps=rms_eps, target_modules=["lin0"]))
    perturb(model, std=0.5)
    layer = tuner_layers(model)[0]
    x = torch.randn(5, 3, 10) * 1e-3
    eps = torch.finfo(torch.float32).eps if rms_eps is None else rms_eps
    with torch.no_grad():
        got = layer(x)
    want = by_hand(x, *tensors(layer), scale=6 / 4, eps=eps)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_sigma_is_computed_from_the_raw_input():
    """Only the A branch sees dropout: with a fixed dropout mask, Σ must equal λ(x), not λ(mask ⊙ x)."""
    model = get_peft_model(make_model("mlp"), flylora.TopLoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["lin0"]))
    perturb(model, std=0.5)
    layer = tuner_layers(model)[0].train()
    keep = (torch.arange(10) % 2).float() * 2.0  # a deterministic "dropout": zero even features, ×2 the rest

    class FixedDropout(nn.Module):
        def forward(self, x):
            return x * keep

    layer.toplora_dropout["default"] = FixedDropout()
    x = torch.randn(4, 10)
    with torch.no_grad():
        got = layer(x)
    eps = torch.finfo(torch.float32).eps
    want = by_hand(x, *tensors(layer), scale=2.0, eps=eps, x_for_A=x * keep)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    wrong = by_hand(x, *tensors(layer), scale=2.0, eps=eps, x_for_A=x * keep, x_for_sigma=x * keep)
    assert not torch.allclose(got.double(), wrong, atol=1e-3)


def test_standalone_layer_equals_the_equation_and_the_function():
    torch.manual_seed(0)
    layer = TopLoraLinear(nn.Linear(12, 7), r=3, alpha=9.0, rms_eps=1e-5)
    with torch.no_grad():
        layer.B.normal_()
        layer.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 12)
    want = by_hand(x, layer.base.weight, layer.base.bias, layer.A, layer.B, layer.theta, layer.gamma, scale=3.0, eps=1e-5)
    torch.testing.assert_close(layer(x).double(), want, atol=1e-6, rtol=1e-5)
    fn = toplora_delta(x, layer.A, layer.B, layer.theta, layer.gamma, 3.0, 1e-5)
    torch.testing.assert_close(layer(x) - layer.base(x), fn, atol=1e-6, rtol=1e-5)


def test_init_and_defaults():
    """Official init: A, Θ ~ U(±1/√n), B = 0, γ = 1; defaults r=8, α=16, dropout 0.05, targets q,k,v."""
    cfg = flylora.TopLoraConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.rms_eps) == (8, 16, 0.05, None)
    assert cfg.target_modules == ["k_proj", "q_proj", "v_proj"]
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("q_proj", nn.Linear(400, 30))
    model = get_peft_model(base, flylora.TopLoraConfig(target_modules=["q_proj"]))
    layer = tuner_layers(model)[0]
    A, B, theta, gamma = (getattr(layer, f"toplora_{t}")["default"] for t in ("A", "B", "theta", "gamma"))
    bound = 1 / math.sqrt(400)
    assert theta.shape == (400, 8) and A.shape == (8, 400) and B.shape == (30, 8)
    for t in (A, theta):
        assert t.abs().max() <= bound and t.abs().max() > 0.95 * bound
        assert abs(t.std().item() - bound / math.sqrt(3)) < 0.1 * bound  # uniform: std = bound/√3
    assert torch.equal(B, torch.zeros_like(B)) and torch.equal(gamma, torch.ones_like(gamma))
    assert layer.scaling["default"] == 2.0


def test_theta_and_gamma_train_only_once_b_is_nonzero():
    """With B = 0 the Σ branch is multiplied by zero, so Θ and γ get exactly zero gradient; B gets one."""
    model = get_peft_model(make_model("mlp"), flylora.TopLoraConfig(r=4, lora_dropout=0.0, target_modules=["lin0"]))
    layer = tuner_layers(model)[0]
    layer(torch.randn(6, 10)).pow(2).sum().backward()
    assert torch.equal(layer.toplora_theta["default"].grad, torch.zeros(10, 4))
    assert torch.equal(layer.toplora_gamma["default"].grad, torch.zeros(4))
    assert layer.toplora_B["default"].grad.abs().sum() > 0
    model.zero_grad()
    perturb(model)
    layer(torch.randn(6, 10)).pow(2).sum().backward()
    assert layer.toplora_theta["default"].grad.abs().sum() > 0 and layer.toplora_gamma["default"].grad.abs().sum() > 0


def test_merge_error_names_the_reason():
    model = get_peft_model(make_model("mlp"), flylora.TopLoraConfig(r=4, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="depends on each token"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        tuner_layers(model)[0].get_delta_weight("default")


@pytest.mark.parametrize("bad", [{"rms_eps": 0.0}, {"rms_eps": -1e-6}, {"rms_eps": "1e-6"}, {"r": 0}, {"lora_dropout": 1.0}])
def test_bad_config_values_raise_one_line(bad):
    with pytest.raises(ValueError) as e:
        flylora.TopLoraConfig(**bad)
    msg = str(e.value)
    assert "\n" not in msg and list(bad)[0] in msg and "allowed" in msg
