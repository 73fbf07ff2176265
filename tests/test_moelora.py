"""MoE-LoRA: the one-matmul block-mask computation against the official per-expert loop, and the
√g gate rescaling against a hand computation of its gradients.

Hand computation (one token x, loss L = ⟨w, h⟩, expert i with u_i = A_i x, E_i = s·B_i u_i):
    none:  ∂L/∂B_i = s·g_i·w u_iᵀ      ∂L/∂A_i = s·g_i·(B_iᵀw) xᵀ      ∂L/∂g_i = s·wᵀB_i u_i
    sqrt:  ∂L/∂B_i = s·√g_i·w u_iᵀ     ∂L/∂A_i = s·√g_i·(B_iᵀw) xᵀ     ∂L/∂g_i = s·wᵀB_i u_i
so the expert gradients are the baseline's times exactly 1/√g_i, and the gate's are unchanged.
"""
from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

import flylora
from flylora.layers.moelora import MoeLoraLinear, moelora_delta, route, switch_aux_loss
from helpers import make_model, perturb, tuner_layers


def official_loop(x, A, B, gate, top_k, scale, mode):
    """THUDM/MoELoRA_Riemannian `moe_lora.py` forward, one expert at a time."""
    E = gate.shape[0]
    r = A.shape[0] // E
    g = torch.softmax(x @ gate.t(), dim=-1)
    chosen = torch.nn.functional.one_hot(torch.topk(g, top_k, dim=-1).indices, num_classes=E).sum(dim=-2)
    g = g * chosen
    g = g / g.sum(dim=-1, keepdim=True)
    out = 0
    for i in range(E):
        expert = (x @ A[i * r : (i + 1) * r].t()) @ B[:, i * r : (i + 1) * r].t() * scale
        gi = g[..., i : i + 1]
        if mode == "sqrt":
            c = (gi**0.5).detach()
            out = out + c * expert + (gi - c) * expert.detach()
        else:
            out = out + gi * expert
    return out


def leaves(E=5, r=3, n=8, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in ((E * r, n), (m, E * r), (E, n), (4, 7, n))]


@pytest.mark.parametrize("mode", ["sqrt", "none"])
def test_block_mask_equals_per_expert_loop(mode):
    """Forward and the gradients of A, B, the gate and x agree with the official loop."""
    A, B, gate, x = leaves()
    w = torch.randn(4, 7, 6)
    got, _, _ = moelora_delta(x, A, B, gate, top_k=2, scale=1.5, gate_rescaling=mode)
    (got * w).sum().backward()
    mine = [t.grad.clone() for t in (A, B, gate, x)]
    for t in (A, B, gate, x):
        t.grad = None
    want = official_loop(x, A, B, gate, 2, 1.5, mode)
    (want * w).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g_mine, t in zip(mine, (A, B, gate, x)):
        torch.testing.assert_close(g_mine, t.grad, atol=1e-5, rtol=1e-5)


def test_sqrt_rescaling_matches_the_hand_computed_gradients():
    E, r, n, m, s = 4, 2, 6, 5, 2.0
    A, B, gate, _ = leaves(E, r, n, m, seed=3)
    x = torch.randn(1, n)
    w = torch.randn(m)
    grads, outs = {}, {}
    for mode in ("sqrt", "none"):
        for t in (A, B, gate):
            t.grad = None
        out, _, _ = moelora_delta(x, A, B, gate, top_k=3, scale=s, gate_rescaling=mode)
        (out[0] * w).sum().backward()
        outs[mode], grads[mode] = out.detach(), [t.grad.clone() for t in (A, B, gate)]
    torch.testing.assert_close(outs["sqrt"], outs["none"], atol=1e-6, rtol=1e-6)  # forward unchanged
    torch.testing.assert_close(grads["sqrt"][2], grads["none"][2], atol=1e-6, rtol=1e-6)  # gate unchanged

    g = route(x, gate, 3)[0][0].detach()  # (E,)
    assert int((g > 0).sum()) == 3
    with torch.no_grad():
        for i in range(E):
            Ai, Bi = A[i * r : (i + 1) * r], B[:, i * r : (i + 1) * r]
            u = Ai @ x[0]  # (r,)
            for mode, c in (("sqrt", g[i].sqrt()), ("none", g[i])):
                dB = s * c * torch.outer(w, u)
                dA = s * c * torch.outer(Bi.t() @ w, x[0])
                torch.testing.assert_close(grads[mode][1][:, i * r : (i + 1) * r], dB, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(grads[mode][0][i * r : (i + 1) * r], dA, atol=1e-5, rtol=1e-5)
            if g[i] > 0:  # the exact factor between the two modes: 1/√g_i
                torch.testing.assert_close(
                    grads["sqrt"][1][:, i * r : (i + 1) * r], grads["none"][1][:, i * r : (i + 1) * r] / g[i].sqrt()
                )
            else:  # unselected experts get nothing in either mode
                assert not grads["sqrt"][0][i * r : (i + 1) * r].any() and not grads["none"][0][i * r : (i + 1) * r].any()


def test_routing_is_softmax_topk_renormalised():
    x, gate = torch.randn(10, 8), torch.randn(6, 8)
    g, p, mask = route(x, gate, 4)
    torch.testing.assert_close(p, torch.softmax(x @ gate.t(), -1))
    assert torch.equal(mask.sum(-1), torch.full((10,), 4.0))
    assert torch.equal(g > 0, mask.bool())
    torch.testing.assert_close(g.sum(-1), torch.ones(10))
    top = p.topk(4, dim=-1).indices
    torch.testing.assert_close(g.gather(-1, top), p.gather(-1, top) / p.gather(-1, top).sum(-1, keepdim=True))


def test_peft_model_equals_base_plus_loop():
    model = get_peft_model(
        make_model("mlp"), flylora.MoeLoraConfig(num_experts=3, expert_r=2, top_k=2, lora_alpha=6, target_modules=["lin0"])
    ).eval()
    perturb(model)
    layer = tuner_layers(model)[0]
    assert layer.scaling["default"] == 3.0  # s = lora_alpha / expert_r
    x = torch.randn(5, 10)
    with torch.no_grad():
        want = layer.base_layer(x) + official_loop(
            x, layer.moelora_A["default"], layer.moelora_B["default"], layer.moelora_gate["default"], 2, 3.0, "none"
        )
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_aux_loss_off_by_default_and_switch_formula_when_on():
    cfg = dict(num_experts=4, expert_r=2, top_k=2, lora_dropout=0.0, target_modules=["lin0", "lin1"])
    model = get_peft_model(make_model("mlp"), flylora.MoeLoraConfig(**cfg)).train()
    model(X=torch.randn(6, 10))
    assert all(not layer.aux_losses for layer in tuner_layers(model))
    assert flylora.moe_aux_loss(model).item() == 0.0

    model = get_peft_model(make_model("mlp"), flylora.MoeLoraConfig(aux_loss_coef=0.1, **cfg)).train()
    seen = {}
    for layer in tuner_layers(model):
        layer.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod.layer_key, args[0].detach()))
    model(X=torch.randn(6, 10))
    want = 0.0
    for layer in tuner_layers(model):
        x, gate = seen[layer.layer_key], layer.moelora_gate["default"]
        p = torch.softmax(x @ gate.t(), -1)
        M = torch.zeros_like(p).scatter(-1, p.topk(2, -1).indices, 1.0)
        f, P = M.sum(0) / M.sum(), p.mean(0)
        want = want + 0.1 * 4 * (f * P).sum()
    aux = flylora.moe_aux_loss(model)
    torch.testing.assert_close(aux, want)
    aux.backward()
    for layer in tuner_layers(model):
        assert layer.moelora_gate["default"].grad.abs().sum() > 0
    last = tuner_layers(model)[-1]  # L_aux reads only the gate of its own layer (earlier layers feed its input)
    assert last.moelora_A["default"].grad is None and last.moelora_B["default"].grad is None
    assert flylora.moe_aux_loss(model).item() == 0.0  # cleared after collection
    model.eval()
    with torch.no_grad():
        model(X=torch.randn(6, 10))
    assert all(not layer.aux_losses for layer in tuner_layers(model))


def test_aux_loss_is_one_when_balanced():
    probs = torch.full((8, 4), 0.25)
    mask = torch.zeros(8, 4).scatter(-1, torch.arange(8).remainder(4)[:, None], 1.0)
    torch.testing.assert_close(switch_aux_loss(probs, mask), torch.tensor(1.0))


def test_defaults_init_and_seeding():
    cfg = flylora.MoeLoraConfig()
    assert (cfg.num_experts, cfg.expert_r, cfg.top_k, cfg.gate_rescaling, cfg.r) == (20, 4, 10, "sqrt", 80)
    assert (cfg.lora_alpha, cfg.lora_dropout, cfg.aux_loss_coef) == (16, 0.05, 0.0)
    assert cfg.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    gates = []
    for _ in range(2):
        torch.manual_seed(7)
        layer = MoeLoraLinear(torch.nn.Linear(50, 9), num_experts=5, expert_r=3, top_k=2)
        gates.append(layer.gate.detach().clone())
        assert torch.equal(layer.B, torch.zeros(9, 15))
        assert layer.A.abs().max() <= 1 / math.sqrt(50) and layer.gate.abs().max() <= 1 / math.sqrt(50)
    assert torch.equal(gates[0], gates[1])  # seeded: same torch seed, same gate


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"top_k": 21}, "top_k"), ({"num_experts": 0}, "num_experts"), ({"expert_r": 1.5}, "expert_r"),
        ({"gate_rescaling": "g"}, "gate_rescaling"), ({"r": 8}, "r=8"), ({"aux_loss_coef": -1}, "aux_loss_coef"),
    ],
)  # fmt: skip
def test_bad_config_values_raise_one_line(bad, word):
    with pytest.raises(ValueError) as e:
        flylora.MoeLoraConfig(**bad)
    assert "\n" not in str(e.value) and word in str(e.value) and "allowed" in str(e.value)
