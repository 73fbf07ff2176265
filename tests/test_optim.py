"""Riemannian preconditioned SGD / AdamW against steps computed by hand (float64, explicit inverse):

    G̃_A = (BᵀB + δI)⁻¹ G_A,   G̃_B = G_B (AAᵀ + δI)⁻¹        per pair, and per expert block
"""
from __future__ import annotations

import copy
import io
import logging
import math

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model

import flylora
from flylora.optim import RiemannianAdamW, RiemannianSGD, find_pairs, precondition_a, precondition_b, riemannian_param_groups
from helpers import make_inputs, make_model, output_of, perturb, tuner_layers


def inv(M):
    return torch.linalg.inv(M.double())


def lora_mlp(seed=0):
    """PEFT LoRA r=2 on lin0 (10 -> 20) with nonzero B and fixed random gradients on A and B."""
    model = get_peft_model(make_model("mlp"), LoraConfig(r=2, target_modules=["lin0"]))
    layer = tuner_layers(model)[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        B.copy_(torch.randn(B.shape, generator=g))
    return model, A, B, g


def set_grads(A, B, g):
    A.grad = torch.randn(A.shape, generator=g)
    B.grad = torch.randn(B.shape, generator=g)
    return A.grad.double().clone(), B.grad.double().clone()


def pre_A(GA, B, delta):
    return inv(B.double().t() @ B.double() + delta * torch.eye(B.shape[1])) @ GA


def pre_B(GB, A, delta):
    return GB @ inv(A.double() @ A.double().t() + delta * torch.eye(A.shape[0]))


# ---- the optimizer steps ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["current_a", "updated_a"])
def test_sgd_step_equals_hand_computation(mode):
    model, A, B, g = lora_mlp()
    lr, wd, delta = 0.05, 0.1, 0.3
    opt = RiemannianSGD.from_model(model, lr=lr, weight_decay=wd, delta=delta, precondition_b_with=mode)
    for _ in range(2):
        A0, B0 = A.detach().double().clone(), B.detach().double().clone()
        GA, GB = set_grads(A, B, g)
        A1 = A0 * (1 - lr * wd) - lr * pre_A(GA, B0, delta)
        B1 = B0 * (1 - lr * wd) - lr * pre_B(GB, A1 if mode == "updated_a" else A0, delta)
        opt.step()
        torch.testing.assert_close(A.double(), A1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(B.double(), B1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["current_a", "updated_a"])
@pytest.mark.parametrize("correct_bias", [False, True])
def test_adamw_steps_equal_hand_computation(mode, correct_bias):
    model, A, B, g = lora_mlp(seed=1)
    lr, wd, delta, (b1, b2), eps = 0.01, 0.05, 0.2, (0.9, 0.999), 1e-6
    opt = RiemannianAdamW.from_model(
        model, lr=lr, weight_decay=wd, delta=delta, correct_bias=correct_bias, precondition_b_with=mode
    )
    mom = {k: [torch.zeros(1, dtype=torch.float64)] * 2 for k in "AB"}  # (m, v) per factor

    def adam(p0, gt, key, t):
        m, v = mom[key]
        m, v = b1 * m + (1 - b1) * gt, b2 * v + (1 - b2) * gt * gt
        mom[key] = [m, v]
        step = lr * (math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else 1.0)
        return (p0 - step * m / (v.sqrt() + eps)) * (1 - lr * wd)

    for t in (1, 2, 3):
        A0, B0 = A.detach().double().clone(), B.detach().double().clone()
        GA, GB = set_grads(A, B, g)
        A1 = adam(A0, pre_A(GA, B0, delta), "A", t)
        B1 = adam(B0, pre_B(GB, A1 if mode == "updated_a" else A0, delta), "B", t)
        opt.step()
        torch.testing.assert_close(A.double(), A1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(B.double(), B1, atol=1e-6, rtol=1e-5)


def test_the_two_b_options_differ():
    """Sanity for the option itself: after A moves, A_{t+1} gives a different B step than A_t."""
    results = []
    for mode in ("current_a", "updated_a"):
        model, A, B, g = lora_mlp()
        set_grads(A, B, g)
        RiemannianSGD.from_model(model, lr=0.5, delta=0.1, precondition_b_with=mode).step()
        results.append(B.detach().clone())
    assert not torch.allclose(*results)


# ---- block structure --------------------------------------------------------------------------------
def test_per_expert_blocks_equal_a_loop_over_experts():
    E, r, n, m, delta = 3, 2, 7, 5, 1e-3
    A, B, GA, GB = torch.randn(E * r, n), torch.randn(m, E * r), torch.randn(E * r, n), torch.randn(m, E * r)
    gA, okA = precondition_a(GA, B, blocks=E, delta=delta)
    gB, okB = precondition_b(GB, A, blocks=E, delta=delta)
    assert okA.all() and okB.all()
    for j in range(E):
        rows = slice(j * r, (j + 1) * r)
        torch.testing.assert_close(gA[rows].double(), pre_A(GA[rows].double(), B[:, rows], delta), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gB[:, rows].double(), pre_B(GB[:, rows].double(), A[rows], delta), atol=1e-5, rtol=1e-4)


def test_hydra_shared_a_uses_the_mean_head_gram():
    N, r, n, m, delta = 3, 2, 6, 4, 1e-2
    A, B, GA, GB = torch.randn(r, n), torch.randn(m, N * r), torch.randn(r, n), torch.randn(m, N * r)
    gA, _ = precondition_a(GA, B, blocks=N, shared_A=True, delta=delta)
    heads = [B[:, j * r : (j + 1) * r].double() for j in range(N)]
    mean_gram = sum(h.t() @ h for h in heads) / N
    torch.testing.assert_close(gA.double(), inv(mean_gram + delta * torch.eye(r)) @ GA.double(), atol=1e-5, rtol=1e-4)
    gB, _ = precondition_b(GB, A, blocks=N, shared_A=True, delta=delta)
    for j in range(N):
        cols = slice(j * r, (j + 1) * r)
        torch.testing.assert_close(gB[:, cols].double(), pre_B(GB[:, cols].double(), A, delta), atol=1e-5, rtol=1e-4)


# ---- pairs come from the model's structure ----------------------------------------------------------
def test_peft_lora_pairs_come_from_modules_and_adapter_names():
    model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.add_adapter("other", LoraConfig(r=3, target_modules=["q_proj"]))  # inactive: not trainable
    pairs, gates = find_pairs(model)
    layers = tuner_layers(model)
    assert len(pairs) == len(layers) == 6 and not gates
    for pair, layer in zip(pairs, layers):
        assert pair.A is layer.lora_A["default"].weight and pair.B is layer.lora_B["default"].weight
        assert pair.name.endswith(f"{layer_path(model, layer)}[default]")


def layer_path(model, layer):
    return next(name for name, m in model.named_modules() if m is layer)


def test_parameter_order_does_not_matter():
    """Reversing the group's parameter list (B before A everywhere) gives the same step."""
    outs = []
    for reverse in (False, True):
        model, A, B, g = lora_mlp()
        set_grads(A, B, g)
        groups = riemannian_param_groups(model)
        if reverse:
            groups[0]["params"] = groups[0]["params"][::-1]
        RiemannianAdamW(groups, lr=0.01).step()
        outs.append((A.detach().clone(), B.detach().clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_adalora_flylora_toplora_pairs():
    ada = get_peft_model(make_model("mlp"), AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["lin0"]))
    (pair,), _ = find_pairs(ada)
    layer = tuner_layers(ada)[0]
    assert pair.A is layer.lora_A["default"] and pair.B is layer.lora_B["default"]  # λ (lora_E) is not paired
    groups = riemannian_param_groups(ada)
    assert any(p is layer.lora_E["default"] for p in groups[0]["params"])

    fly = get_peft_model(make_model("mlp"), flylora.FlyLoraConfig(r=4, k=2, target_modules=["lin0"]))
    perturb(fly)
    (pair,), _ = find_pairs(fly)
    layer = tuner_layers(fly)[0]
    assert pair.A is None and pair.trainable() == [layer.flylora_B["default"]]
    B0 = layer.flylora_B["default"].detach().double().clone()
    GB = torch.randn(20, 4)
    layer.flylora_B["default"].grad = GB.clone()
    RiemannianSGD.from_model(fly, lr=0.1, delta=1e-4).step()
    want = B0 - 0.1 * pre_B(GB.double(), layer.flylora_A["default"], 1e-4)  # the frozen A preconditions B
    torch.testing.assert_close(layer.flylora_B["default"].double(), want, atol=1e-6, rtol=1e-5)

    top = get_peft_model(make_model("mlp"), flylora.TopLoraConfig(r=2, target_modules=["lin0"]))
    (pair,), _ = find_pairs(top)
    layer = tuner_layers(top)[0]
    assert pair.A is layer.toplora_A["default"] and pair.B is layer.toplora_B["default"]
    assert sum(p.numel() for p in riemannian_param_groups(top)[0]["params"]) == sum(
        p.numel() for p in top.parameters() if p.requires_grad
    )  # Θ and γ are in the group, with plain steps


def test_moelora_gate_group_lr_and_clipping():
    model = get_peft_model(
        make_model("mlp"), flylora.MoeLoraConfig(num_experts=3, expert_r=2, top_k=2, target_modules=["lin0", "lin1"])
    )
    perturb(model)
    pairs, gates = find_pairs(model)
    assert [p.blocks for p in pairs] == [3, 3] and len(gates) == 2
    opt = RiemannianSGD.from_model(model, lr=0.1, gate_lr=0.5, gate_max_norm=1e-5)
    assert [g["role"] for g in opt.param_groups] == ["adapter", "gate"] and opt.param_groups[1]["lr"] == 0.5
    output_of(model, make_inputs("mlp")).pow(2).sum().backward()
    before = [g.detach().clone() for g in gates]
    grads = [g.grad.clone() for g in gates]
    norm = torch.sqrt(sum(gr.pow(2).sum() for gr in grads))
    assert norm > 1e-5
    opt.step()
    for g, b, gr in zip(gates, before, grads):  # plain SGD on the jointly clipped gate gradient
        torch.testing.assert_close(g.detach(), b - 0.5 * gr * (1e-5 / (norm + 1e-6)), atol=1e-7, rtol=1e-5)


# ---- failures are logged, never silent ---------------------------------------------------------------
def test_singular_solve_falls_back_with_a_warning(caplog):
    """δ = 0 and B = 0 (fresh LoRA): BᵀB is singular; A takes its plain gradient and a warning says so."""
    model = get_peft_model(make_model("mlp"), LoraConfig(r=2, target_modules=["lin0"]))
    layer = tuner_layers(model)[0]
    A = layer.lora_A["default"].weight
    A0, GA = A.detach().clone(), torch.randn(A.shape)
    A.grad = GA.clone()
    with caplog.at_level(logging.WARNING, logger="flylora.optim"):
        RiemannianSGD.from_model(model, lr=0.1, delta=0.0).step()
    torch.testing.assert_close(A.detach(), A0 - 0.1 * GA)
    assert any("solve failed" in r.message and "lin0[default] A" in r.message for r in caplog.records)


def test_plain_parameter_list_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="flylora.optim"):
        RiemannianAdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    assert any("no low-rank pairs" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "bad", [{"precondition_b_with": "new_a"}, {"delta": -1.0}, {"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": -1}]
)
def test_bad_options_raise_one_line(bad):
    model, *_ = lora_mlp()
    with pytest.raises(ValueError) as e:
        RiemannianAdamW.from_model(model, **bad)
    assert "\n" not in str(e.value) and "allowed" in str(e.value)


def test_state_dict_round_trip_continues_identically():
    model_a, A, B, _ = lora_mlp()
    model_b = copy.deepcopy(model_a)
    opt_a = RiemannianAdamW.from_model(model_a, lr=0.01)
    opt_b = RiemannianAdamW.from_model(model_b, lr=0.01)
    grads = [torch.randn(2, 10), torch.randn(20, 2)]

    def step(model, opt):
        layer = tuner_layers(model)[0]
        layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad = (g.clone() for g in grads)
        opt.step()

    step(model_a, opt_a), step(model_a, opt_a)
    step(model_b, opt_b)
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    assert all("pairs" not in g for g in opt_b.state_dict()["param_groups"])
    opt_c = RiemannianAdamW.from_model(model_b, lr=0.01)
    opt_c.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert len(opt_c.param_groups[0]["pairs"]) == 1
    step(model_b, opt_c)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


MLP2 = {"target_modules": ["lin0", "lin1"]}


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, **MLP2),
        flylora.MoeLoraConfig(num_experts=4, expert_r=2, top_k=2, lora_dropout=0.0, **MLP2),
        flylora.HydraLoraConfig(r=2, **MLP2),
        flylora.SplitLoraConfig(r=4, num_experts=2, **MLP2),
    ],
    ids=["lora", "moelora", "hydralora", "splitlora"],
)
def test_training_reduces_the_loss(config):
    """End to end on PEFT LoRA and the routed methods: 40 RiemannianAdamW steps fit a fixed target."""
    base = make_model("mlp")
    base.norm = torch.nn.Identity()  # a LayerNorm over 2 outputs can only emit ±1: fit the raw outputs
    torch.manual_seed(0)
    model = get_peft_model(base, config).train()
    X, target = torch.randn(32, 10), torch.randn(32, 2)
    opt = RiemannianAdamW.from_model(model, lr=3e-3, gate_lr=1e-3)
    losses = []
    for _ in range(40):
        loss = (model(X=X) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_peft_embedding_and_conv_pairs_use_their_matrix_forms():
    """LoRA on nn.Embedding (A: (r, V), B: (d, r)) and nn.Conv2d (A: (r, c, k, k), B: (o, r, 1, 1)) is
    preconditioned on the matrix views A ∈ R^{r×(c·k·k)}, B ∈ R^{o×r}."""

    class EmbConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = torch.nn.Embedding(30, 8), torch.nn.Conv2d(8, 6, 3)

    torch.manual_seed(0)
    model = get_peft_model(EmbConv(), LoraConfig(r=2, target_modules=["emb", "conv"]))
    pairs, _ = find_pairs(model)
    assert [p.name.split(".")[-1] for p in pairs] == ["emb[default]", "conv[default]"]
    before, grads = {}, {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.normal_()
            before[n], p.grad = p.detach().double().clone(), torch.randn_like(p)
            grads[n] = p.grad.double().clone()
    RiemannianSGD.from_model(model, lr=0.1, delta=0.5).step()
    key = lambda s: next(n for n in before if s in n)  # noqa: E731
    A0, B0 = before[key("conv.lora_A")].reshape(2, -1), before[key("conv.lora_B")].reshape(6, 2)
    want_A = A0 - 0.1 * pre_A(grads[key("conv.lora_A")].reshape(2, -1), B0, 0.5)
    torch.testing.assert_close(model.base_model.model.conv.lora_A["default"].weight.double().reshape(2, -1), want_A)
    eA, eB = before[key("lora_embedding_A")], before[key("lora_embedding_B")]
    want_B = eB - 0.1 * pre_B(grads[key("lora_embedding_B")], eA, 0.5)
    torch.testing.assert_close(model.base_model.model.emb.lora_embedding_B["default"].double(), want_B)
