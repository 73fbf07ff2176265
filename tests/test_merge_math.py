"""flylora.merge: every merge against its ΔW formula computed by hand, the PEFT round-trip,
and the interference statistics (cosines, A_iA_jᵀ, CKA, JL)."""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

try:
    import flylora.merge  # noqa: F401
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flylora.merge import (  # noqa: E402
    LowRankDelta,
    cosine_summary,
    cross_projection_norms,
    cross_projection_summary,
    dare,
    delta_weight,
    delta_weights,
    factors_from_peft_model,
    jl_distance_ratios,
    jl_summary,
    knots,
    knots_lowrank,
    legacy_separate_average,
    linear_cka,
    lora_state_dict,
    merged_full_weights,
    pairwise_cosines,
    predicted_cross_frobenius,
    save_peft_lora_adapter,
    svd_truncate,
    task_arithmetic,
    task_arithmetic_lowrank,
    ties,
    weight_average,
    weight_average_lowrank,
)

SHAPES = {"layer.q": (6, 5), "layer.v": (4, 7)}  # module -> (m, n)


def make_tasks(ranks=(2, 3, 1), scales=(2.0, 0.5, 1.5), seed=0, dtype=torch.float64, shared_A=False):
    """T random task adapters over SHAPES with different ranks and scales."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for i, (r, s) in enumerate(zip(ranks, scales)):
        t = {}
        for name, (m, n) in SHAPES.items():
            if shared_A:
                A = torch.randn(r, n, generator=torch.Generator().manual_seed(99), dtype=dtype)
            else:
                A = torch.randn(r, n, generator=g, dtype=dtype)
            t[name] = LowRankDelta(B=torch.randn(m, r, generator=g, dtype=dtype), A=A, scale=s)
        tasks.append(t)
    return tasks


def by_hand(f: LowRankDelta) -> torch.Tensor:
    return f.scale * f.B @ f.A


# ---------------------------------------------------------------------------------------------
# LowRankDelta and input checks


def test_delta_weight_is_scale_B_A():
    f = LowRankDelta(B=torch.randn(4, 2), A=torch.randn(2, 3), scale=0.25)
    torch.testing.assert_close(delta_weight(f), 0.25 * f.B @ f.A)
    assert f.shape == (4, 3) and f.rank == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"B": torch.zeros(4, 2), "A": torch.zeros(3, 5)}, "rank mismatch"),
        ({"B": torch.zeros(4), "A": torch.zeros(2, 5)}, "B must be a 2-D"),
        ({"B": torch.zeros(4, 2), "A": torch.zeros(2, 5), "scale": float("nan")}, "scale must be"),
        ({"B": torch.zeros(4, 2), "A": torch.zeros(2, 5), "k": 3}, "k must be in"),
    ],
)
def test_low_rank_delta_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankDelta(**kwargs)


def test_bad_merge_inputs_raise_one_line_errors():
    tasks = make_tasks()
    missing = [tasks[0], {k: v for k, v in tasks[1].items() if k != "layer.v"}]
    with pytest.raises(ValueError, match="task 1 modules differ"):
        weight_average(missing)
    wrong_shape = copy.copy(tasks[1])
    wrong_shape["layer.q"] = LowRankDelta(B=torch.randn(6, 2), A=torch.randn(2, 9))
    with pytest.raises(ValueError, match="ΔW shape"):
        weight_average([tasks[0], wrong_shape])
    with pytest.raises(ValueError, match="density must be in"):
        ties(tasks, density=0.0)
    with pytest.raises(ValueError, match="density must be in"):
        dare(tasks, density=1.5, seed=0)
    with pytest.raises(ValueError, match="3 tasks"):
        task_arithmetic(tasks, [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        weight_average([])
    with pytest.raises(ValueError, match="majority"):
        ties(tasks, density=0.5, majority="vote")
    with pytest.raises(ValueError, match="equal ranks"):
        legacy_separate_average(tasks)


# ---------------------------------------------------------------------------------------------
# linear merges


def test_weight_average_is_eq12():
    tasks = make_tasks()
    merged = weight_average(tasks)
    for name in SHAPES:
        expect = sum(by_hand(t[name]) for t in tasks) / len(tasks)
        torch.testing.assert_close(merged[name], expect)


def test_task_arithmetic_with_negative_weight():
    tasks = make_tasks()
    w = [0.7, -1.3, 2.0]
    merged = task_arithmetic(tasks, w)
    for name in SHAPES:
        expect = w[0] * by_hand(tasks[0][name]) + w[1] * by_hand(tasks[1][name]) + w[2] * by_hand(tasks[2][name])
        torch.testing.assert_close(merged[name], expect)


def test_concatenated_rank_adapter_is_exact_in_fp32():
    tasks = make_tasks(dtype=torch.float32)
    w = [0.5, -1.0, 1.25]
    cat = task_arithmetic_lowrank(tasks, w)
    avg = weight_average_lowrank(tasks)
    for name in SHAPES:
        assert cat[name].rank == 2 + 3 + 1 and cat[name].scale == 1.0
        expect = sum(wi * t[name].scale * t[name].B @ t[name].A for wi, t in zip(w, tasks))
        torch.testing.assert_close(cat[name].B @ cat[name].A, expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(delta_weight(avg[name]), weight_average(tasks)[name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the official code's separate averaging


def test_legacy_average_has_cross_terms_and_differs_from_eq12():
    tasks = make_tasks(ranks=(3, 3, 3), scales=(2.0, 2.0, 2.0))
    biases = [torch.randn(3, dtype=torch.float64) for _ in tasks]
    tasks = [{k: LowRankDelta(f.B, f.A, f.scale, route_bias=b, k=2) for k, f in t.items()} for t, b in zip(tasks, biases)]
    legacy = legacy_separate_average(tasks)
    T = len(tasks)
    for name in SHAPES:
        cross = sum(t_i[name].B @ t_j[name].A for t_i in tasks for t_j in tasks)
        torch.testing.assert_close(delta_weight(legacy[name]), 2.0 / T**2 * cross)
        assert not torch.allclose(delta_weight(legacy[name]), weight_average(tasks)[name], atol=1e-3)
        torch.testing.assert_close(legacy[name].route_bias, sum(biases) / T)
        assert legacy[name].k == 2


def test_legacy_average_equals_eq12_when_A_is_shared():
    tasks = make_tasks(ranks=(3, 3, 3), scales=(2.0, 2.0, 2.0), shared_A=True)
    legacy = delta_weights(legacy_separate_average(tasks))
    avg = weight_average(tasks)
    for name in SHAPES:
        torch.testing.assert_close(legacy[name], avg[name])


def test_legacy_average_rejects_unequal_scales():
    tasks = make_tasks(ranks=(2, 2, 2), scales=(1.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="equal scales"):
        legacy_separate_average(tasks)


# ---------------------------------------------------------------------------------------------
# TIES


def _matrix_task(M):
    """A task whose ΔW is exactly M: B = M, A = I."""
    M = torch.tensor(M, dtype=torch.float64)
    return {"w": LowRankDelta(B=M, A=torch.eye(M.shape[1], dtype=torch.float64), scale=1.0)}


def test_ties_on_hand_made_2x2():
    tasks = [_matrix_task([[4, 1], [-1, 3]]), _matrix_task([[2, 0.5], [-5, 1]]), _matrix_task([[-7, 0.1], [-2, 0.2]])]
    # density 0.5 keeps 2 of 4 entries per task: [[4,0],[0,3]], [[2,0],[-5,0]], [[-7,0],[-2,0]]
    # (0,0): 4, 2, -7. total mass -1 -> "-" -> -7;  count (+2, -1) -> "+" -> mean(4, 2) = 3
    # (0,1): all trimmed -> 0.   (1,0): 0, -5, -2 -> "-" -> -3.5.   (1,1): 3 -> 3
    total = ties(tasks, density=0.5, majority="total")["w"]
    count = ties(tasks, density=0.5, majority="count")["w"]
    torch.testing.assert_close(total, torch.tensor([[-7.0, 0.0], [-3.5, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(count, torch.tensor([[3.0, 0.0], [-3.5, 3.0]], dtype=torch.float64))


def test_ties_density_one_all_agreeing_is_the_mean():
    # no trimming and no sign conflicts: disjoint mean of nonzeros = plain mean
    tasks = [_matrix_task([[1.0, 2.0], [3.0, 4.0]]), _matrix_task([[3.0, 4.0], [1.0, 2.0]])]
    torch.testing.assert_close(ties(tasks, density=1.0)["w"], torch.tensor([[2.0, 3.0], [2.0, 3.0]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# DARE


def test_dare_is_seeded_and_drops_with_rescale():
    tasks = make_tasks()
    a, b, c = dare(tasks, 0.5, seed=1), dare(tasks, 0.5, seed=1), dare(tasks, 0.5, seed=2)
    for name in SHAPES:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
        assert not torch.allclose(a[name], c[name])
    # one task: every entry is either dropped (0) or rescaled by 1/p
    one = dare(tasks[:1], 0.25, seed=3)
    for name in SHAPES:
        dw = by_hand(tasks[0][name])
        kept = one[name] != 0
        torch.testing.assert_close(one[name][kept], dw[kept] / 0.25)
        assert 0 < kept.sum() < dw.numel()
    # density 1 drops nothing: DARE-sum is task arithmetic with unit weights
    full = dare(tasks, 1.0, seed=0)
    for name in SHAPES:
        torch.testing.assert_close(full[name], task_arithmetic(tasks, [1, 1, 1])[name])


def test_dare_ties_without_drop_is_hand_computed_ties():
    tasks = [_matrix_task([[1.0, -2.0], [3.0, 4.0]]), _matrix_task([[-3.0, -1.0], [2.0, -5.0]])]
    # p = 1 drops nothing: sign by mass, disjoint mean.
    # (0,0): 1, -3 -> "-" -> -3;  (0,1): -2, -1 -> -1.5;  (1,0): 3, 2 -> 2.5;  (1,1): 4, -5 -> "-" -> -5
    both = dare(tasks, 1.0, seed=7, combine="ties")["w"]
    torch.testing.assert_close(both, torch.tensor([[-3.0, -1.5], [2.5, -5.0]], dtype=torch.float64))
    # by count (1,1) is a tie (one +, one -), which elects "+": mean of the positive entry = 4
    by_count = dare(tasks, 1.0, seed=7, combine="ties", majority="count")["w"]
    torch.testing.assert_close(by_count, torch.tensor([[1.0, -1.5], [2.5, 4.0]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# KnOTS


def test_knots_single_task_reproduces_input():
    tasks = make_tasks()[:1]
    for merge in ("ties", "mean"):
        out = knots(tasks, merge=merge, density=1.0)
        low = knots_lowrank(tasks, merge=merge)
        for name in SHAPES:
            torch.testing.assert_close(out[name], by_hand(tasks[0][name]))
            torch.testing.assert_close(delta_weight(low[name]), by_hand(tasks[0][name]))


def test_knots_mean_is_eq12_and_ties_matches_explicit_svd():
    tasks = make_tasks()
    mean = knots(tasks, merge="mean")
    tied = knots(tasks, merge="ties", density=0.4)
    for name, (m, n) in SHAPES.items():
        torch.testing.assert_close(mean[name], weight_average(tasks)[name])
        # reference: SVD of the explicit (m, T·n) concatenation, TIES on the V_i blocks by hand
        cat = torch.cat([by_hand(t[name]) for t in tasks], dim=1)
        U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
        K = int((S > 1e-9 * S[0]).sum())
        V = Vh[:K].reshape(K, len(tasks), n).transpose(0, 1)  # (T, K, n)
        k = int(0.4 * K * n)
        trimmed = torch.stack([v * (v.abs() >= v.abs().flatten().topk(k).values[-1]) for v in V])
        sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).double()
        agree = (trimmed.sign() == sign) & (trimmed != 0)
        V_bar = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(tied[name], (U[:, :K] * S[:K]) @ V_bar)
        assert knots_lowrank(tasks, merge="ties", density=0.4)[name].rank == K


# ---------------------------------------------------------------------------------------------
# truncated SVD to write non-linear merges as a LoRA


def test_svd_truncate_reports_the_relative_error():
    tasks = make_tasks()
    merged = ties(tasks, density=0.5)
    full, err_full = svd_truncate(merged, rank=10)
    low, err_low = svd_truncate(merged, rank={"layer.q": 2, "layer.v": 1})
    for name in SHAPES:
        torch.testing.assert_close(delta_weight(full[name]), merged[name])
        assert err_full[name] < 1e-12
        approx = delta_weight(low[name])
        rel = torch.linalg.matrix_norm(merged[name] - approx) / torch.linalg.matrix_norm(merged[name])
        assert math.isclose(err_low[name], float(rel), rel_tol=1e-9) and err_low[name] > 1e-3
    assert low["layer.q"].rank == 2 and low["layer.v"].rank == 1
    with pytest.raises(ValueError, match="rank must be"):
        svd_truncate(merged, rank=0)


# ---------------------------------------------------------------------------------------------
# interference analysis


def test_pairwise_cosines_match_vectorised_delta_w():
    tasks = make_tasks()
    cos = pairwise_cosines(tasks)
    for name in SHAPES:
        vecs = torch.stack([by_hand(t[name]).flatten() for t in tasks])
        expect = torch.nn.functional.cosine_similarity(vecs[:, None], vecs[None, :], dim=-1)
        torch.testing.assert_close(cos[name], expect)
    summary = cosine_summary(tasks, ["a", "b", "c"])
    json.dumps(summary)  # serialisable
    assert summary["tasks"] == ["a", "b", "c"] and len(summary["mean_matrix"]) == 3


def _fly_A(r, n, p, g):
    """FlyLoRA init: p nonzeros per row at random columns, values N(0, 1/r²)."""
    A = torch.zeros(r, n, dtype=torch.float64)
    for i in range(r):
        A[i, torch.randperm(n, generator=g)[:p]] = torch.randn(p, generator=g, dtype=torch.float64) / r
    return A


def test_cross_projection_matches_theorem_3_4():
    g = torch.Generator().manual_seed(0)
    r, n, p = 32, 4096, 1024
    A1, A2 = _fly_A(r, n, p, g), _fly_A(r, n, p, g)
    pred = predicted_cross_frobenius(n, r, p)
    assert math.isclose(pred, 0.5)  # p / (r √n)
    norms = cross_projection_norms(A1, A2)
    assert 0.85 * pred < norms["frobenius"] < 1.15 * pred
    assert norms["spectral"] <= norms["frobenius"]
    # A_i A_iᵀ is far larger: its diagonal is ≈ p / r² = 1
    assert cross_projection_norms(A1, A1)["frobenius"] > 8 * norms["frobenius"]
    tasks = [{"m": LowRankDelta(B=torch.ones(3, r, dtype=torch.float64), A=A)} for A in (A1, A2)]
    summary = cross_projection_summary(tasks)
    json.dumps(summary)
    assert summary["per_module"]["m"][0]["p"] == [1024.0, 1024.0]
    assert 0.85 < summary["mean_ratio_to_prediction"] < 1.15


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert math.isclose(linear_cka(X, X), 1.0, rel_tol=1e-12)
    assert math.isclose(linear_cka(X, 3.7 * X @ Q), 1.0, rel_tol=1e-10)
    Y = torch.randn(200, 8, generator=g, dtype=torch.float64)
    # against the Gram-matrix (HSIC) form: tr(K̃ L̃) / sqrt(tr(K̃ K̃) tr(L̃ L̃)), K = XXᵀ, H = I - 11ᵀ/N
    H = torch.eye(200, dtype=torch.float64) - 1.0 / 200
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    expect = float((K * L).sum() / torch.sqrt((K * K).sum() * (L * L).sum()))
    assert math.isclose(linear_cka(X, Y), expect, rel_tol=1e-9)
    assert linear_cka(X, Y) < 0.3  # independent features: far from 1
    assert math.isclose(linear_cka(X, X + 5.0), 1.0, rel_tol=1e-12)  # centring removes offsets
    with pytest.raises(ValueError, match="same N"):
        linear_cka(X, Y[:10])


def test_jl_distance_ratio_is_near_one_for_fly_A():
    g = torch.Generator().manual_seed(1)
    r, n, p = 32, 512, 128
    A = _fly_A(r, n, p, g)
    X = torch.randn(400, n, generator=g, dtype=torch.float64)
    Y = torch.randn(400, n, generator=g, dtype=torch.float64)
    s = jl_summary(jl_distance_ratios(A, X, Y))
    json.dumps(s)
    assert abs(s["mean"] - 1.0) < 0.1 and 0.1 < s["std"] < 0.5  # spec: mean ≈ 1, std ≈ 0.26 at r = 32
    # the ratio is scale-free in x − y and uses σ² = p/(n r²): doubling A quadruples it
    torch.testing.assert_close(jl_distance_ratios(2 * A, X, Y, p=p), 4 * jl_distance_ratios(A, X, Y, p=p))


def test_plots_write_pngs(tmp_path):
    from flylora.merge.plots import plot_cosine_heatmap, plot_merge_drops

    summary = cosine_summary(make_tasks(), ["mmlu", "sciqa", "gsm8k"])
    heat = plot_cosine_heatmap(summary["mean_matrix"], summary["tasks"], tmp_path / "cos.png")
    drops = {"average": {"mmlu": -2.0, "gsm8k": -20.0}, "ties": {"mmlu": -1.5}}
    bars = plot_merge_drops(drops, tmp_path / "d" / "drops.png")
    for path in (heat, bars):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="task names"):
        plot_cosine_heatmap(summary["mean_matrix"], ["a", "b"], tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# PEFT: extraction and a loadable merged adapter on a tiny Llama


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_factors_from_peft_lora_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(5)
    for mod in model.modules():
        if hasattr(mod, "lora_B") and "default" in mod.lora_B:
            mod.lora_B["default"].weight.data = torch.randn(mod.lora_B["default"].weight.shape, generator=g)
    factors = factors_from_peft_model(model, "default")
    assert sorted(factors) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    layer = model.get_base_model().model.layers[1].self_attn.v_proj
    f = factors["model.layers.1.self_attn.v_proj"]
    assert f.scale == 3.0 and f.shape == (16, 32)
    torch.testing.assert_close(delta_weight(f), layer.get_delta_weight("default"))
    with pytest.raises(ValueError, match="not found"):
        factors_from_peft_model(model, "other")


def test_factors_from_flylora_layers():
    # the FlyLoRA tuner layer's per-adapter attributes, mocked: detection is by attribute presence
    class FakeFlyLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.flylora_A = {"t": torch.randn(8, 5)}  # (r, n) dense frozen buffer
            self.flylora_B = torch.nn.ParameterDict({"t": torch.nn.Parameter(torch.randn(3, 8))})  # (m, r)
            self.flylora_bias = {"t": torch.randn(8)}
            self.scaling = {"t": 2.0}
            self.k = {"t": 2}

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([FakeFlyLayer()])
    f = factors_from_peft_model(model, "t")["blocks.0"]
    layer = model.blocks[0]
    torch.testing.assert_close(delta_weight(f), 2.0 * layer.flylora_B["t"].detach() @ layer.flylora_A["t"])
    assert f.k == 2 and torch.equal(f.route_bias, layer.flylora_bias["t"])


def test_merged_lora_adapter_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    base = _tiny_llama()
    targets = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.1.self_attn.v_proj": (16, 32),
               "model.layers.1.mlp.down_proj": (32, 64)}
    g = torch.Generator().manual_seed(3)
    ranks = [dict(zip(targets, (2, 4, 3))), dict(zip(targets, (3, 1, 3)))]  # per task, per module
    tasks = [
        {
            name: LowRankDelta(
                B=0.3 * torch.randn(m, rk[name], generator=g), A=torch.randn(rk[name], n, generator=g), scale=s
            )
            for name, (m, n) in targets.items()
        }
        for rk, s in zip(ranks, (2.0, 0.5))
    ]
    weights = [0.8, -0.6]
    merged = task_arithmetic(tasks, weights)
    out = save_peft_lora_adapter(task_arithmetic_lowrank(tasks, weights), tmp_path / "merged")
    # the adapter files plus our ownership marker (fsutil: only folders carrying it may be replaced)
    assert sorted(p.name for p in out.iterdir()) == [".flylora", "adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dirs cleaned up
    cfg = json.loads((out / "adapter_config.json").read_text())
    # concatenated ranks: q 2+3 = 5, v 4+1 = 5, down 3+3 = 6 -> r = 5 and down_proj in rank_pattern
    assert cfg["r"] == 5 and cfg["lora_alpha"] == 5 and list(cfg["rank_pattern"].values()) == [6]
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]

    expected = merged_full_weights(base.state_dict(), merged)
    reference = copy.deepcopy(base)
    reference.load_state_dict(expected)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    ids = torch.randint(0, 64, (2, 7), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    # the loaded adapter's weights merge to exactly W0 + ΔW, and its factors come back out
    back = factors_from_peft_model(peft_model, "default")
    for name in targets:
        torch.testing.assert_close(delta_weight(back[name]), merged[name], rtol=1e-5, atol=1e-6)
    unloaded = peft_model.merge_and_unload().state_dict()
    for name in targets:
        torch.testing.assert_close(unloaded[f"{name}.weight"], expected[f"{name}.weight"], rtol=1e-5, atol=1e-6)
        assert unloaded[f"{name}.weight"].dtype == base.state_dict()[f"{name}.weight"].dtype
    with pytest.raises(ValueError, match="already exists"):
        save_peft_lora_adapter(task_arithmetic_lowrank(tasks, weights), out)
    save_peft_lora_adapter(weight_average_lowrank(tasks), out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_state_dict_folds_the_scale_into_B():
    task = make_tasks(dtype=torch.float32)[0]  # scale 2.0, not 1: PEFT's scaling will be 1
    sd = lora_state_dict(task)
    for name, f in task.items():
        A, B = sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape == f.A.shape and B.shape == f.B.shape
        torch.testing.assert_close(B @ A, by_hand(f))
    assert {t.dtype for t in lora_state_dict(task, dtype=torch.bfloat16).values()} == {torch.bfloat16}


def test_merged_full_weights_preserves_dtype_and_checks_shapes():
    base = {"a.weight": torch.randn(3, 4, dtype=torch.bfloat16), "b.weight": torch.randn(2, 2)}
    dw = torch.randn(3, 4)
    out = merged_full_weights(base, {"a": dw})
    assert out["a.weight"].dtype == torch.bfloat16 and out["b.weight"] is base["b.weight"]
    torch.testing.assert_close(out["a.weight"], (base["a.weight"].float() + dw).bfloat16())
    with pytest.raises(ValueError, match="does not match"):
        merged_full_weights(base, {"a": torch.randn(4, 3)})
    with pytest.raises(ValueError, match="no base weight"):
        merged_full_weights(base, {"c": dw})
