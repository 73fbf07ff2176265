"""`flylora merge` end to end: random task adapters on a tiny model -> CLI -> written artifact ->
loaded onto the base model -> compared with ΔW formulas computed by hand in this file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline_child import tiny_model_dir

T = 3
MODULE = "model.layers.1.mlp.down_proj"  # a module checked in detail (layer-level union test)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny base model + 3 random FlyLoRA adapters (independent A's, random B and routing bias)
    + 3 random LoRA adapters (ranks 4, 2, 4 and different alphas)."""
    from peft import LoraConfig, get_peft_model

    import flylora
    from flylora.models import load_model

    root = tmp_path_factory.mktemp("merge")
    model_dir = tiny_model_dir(root / "model")
    g = torch.Generator().manual_seed(0)
    fly, lora = [], []
    for i in range(T):
        m = get_peft_model(load_model(model_dir), flylora.FlyLoraConfig(r=8, k=2, lora_alpha=16, projection_seed=100 + i))
        with torch.no_grad():
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                if "flylora_B" in name:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
                elif "flylora_bias" in name:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        m.peft_config["default"].base_model_name_or_path = model_dir
        m.save_pretrained(str(root / f"fly{i}"))
        fly.append(str(root / f"fly{i}"))
        r = [4, 2, 4][i]
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        m = get_peft_model(load_model(model_dir), LoraConfig(r=r, lora_alpha=[8, 6, 2][i], target_modules=targets))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        m.peft_config["default"].base_model_name_or_path = model_dir
        m.save_pretrained(str(root / f"lora{i}"))
        lora.append(str(root / f"lora{i}"))
    return {"root": root, "model": model_dir, "flylora": fly, "lora": lora}


# ------------------------------------------------------------------------------ by hand
def hand_factors(kind: str, paths: list[str], model_dir: str) -> list[dict]:
    """Per task {module: (s, B, A, d, k)} read from the adapter files; FlyLoRA's A (regenerated from
    the seed, not stored) is taken from the loaded layer's buffer, the tensor its forward uses."""
    from flylora.loading import load_adapter
    from flylora.models import load_model

    out = []
    for path in paths:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        sd = load_file(str(Path(path) / "adapter_model.safetensors"))
        task = {}
        if kind == "lora":
            s = cfg["lora_alpha"] / cfg["r"]
            for key in sd:
                if key.endswith("lora_A.weight"):
                    mod = key[len("base_model.model."):-len(".lora_A.weight")]
                    task[mod] = (s, sd[key.replace("lora_A", "lora_B")], sd[key], None, None)
        else:
            model = load_adapter(load_model(model_dir), path)
            layers = dict(model.get_base_model().named_modules())
            s = cfg["lora_alpha"] / cfg["r"]
            for key in sd:
                if key.endswith(".flylora_B"):
                    mod = key[len("base_model.model."):-len(".flylora_B")]
                    A = layers[mod].flylora_A["default"].detach().clone()
                    task[mod] = (s, sd[key], A, sd[key.replace("flylora_B", "flylora_bias")], cfg["k"])
        out.append(task)
    return out


def dW(f) -> torch.Tensor:
    s, B, A = f[0], f[1].double(), f[2].double()
    return s * B @ A


def ties_by_hand(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    kept = []
    for t in taus:
        k = max(1, int(density * t.numel()))
        thresh = t.abs().flatten().sort(descending=True).values[k - 1]
        kept.append(torch.where(t.abs() >= thresh, t, torch.zeros_like(t)))
    S = torch.stack(kept)
    sign = torch.where(S.sum(0) >= 0, 1.0, -1.0).to(S.dtype)
    agree = (torch.sign(S) == sign) & (S != 0)
    return (S * agree).sum(0) / agree.sum(0).clamp(min=1)


def knots_ties_by_hand(ws: list[torch.Tensor], density: float) -> torch.Tensor:
    n = ws[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(ws, dim=1), full_matrices=False)
    K = int((S > S.max() * 1e-8).sum())
    V = [Vh[:K, i * n:(i + 1) * n] for i in range(len(ws))]
    return (U[:, :K] * S[:K]) @ ties_by_hand(V, density)


def expected(method: str, tasks: list[dict], **kw) -> dict[str, torch.Tensor]:
    out = {}
    for mod in tasks[0]:
        ws = [dW(t[mod]) for t in tasks]
        if method == "weight_average":
            out[mod] = sum(ws) / len(ws)
        elif method == "task_arithmetic":
            out[mod] = sum(w * x for w, x in zip(kw["weights"], ws))
        elif method == "ties":
            out[mod] = ties_by_hand(ws, kw["density"])
        elif method == "knots_mean":
            out[mod] = sum(ws) / len(ws)
        elif method == "knots_ties":
            out[mod] = knots_ties_by_hand(ws, kw["density"])
        elif method == "dare_dense":
            out[mod] = sum(ws)
        elif method == "legacy_dense":
            s = tasks[0][mod][0]
            B = torch.stack([t[mod][1].double() for t in tasks]).mean(0)
            A = torch.stack([t[mod][2].double() for t in tasks]).mean(0)
            out[mod] = s * B @ A
    return out


# ------------------------------------------------------------------------------ checks
def merged_weights(kind: str, path: Path, model_dir: str) -> dict[str, torch.Tensor]:
    """The weights the written artifact gives each linear layer once loaded onto the base."""
    from flylora.loading import load_adapter
    from flylora.models import load_model

    if kind == "full":
        model = load_model(str(path))
    else:
        model = load_adapter(load_model(model_dir), str(path)).merge_and_unload()
    return {n: m.weight.detach().double() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def reference_model(model_dir: str, deltas: dict[str, torch.Tensor]):
    from flylora.models import load_model

    model = load_model(model_dir)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in deltas:
                m.weight.copy_((m.weight.double() + deltas[name]).float())
    return model


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_against_hand(setup, path: Path, fmt: str, deltas: dict[str, torch.Tensor], atol: float = 2e-5):
    from flylora.loading import load_adapter
    from flylora.models import load_model

    base = {n: m.weight.detach().double() for n, m in load_model(setup["model"]).named_modules()
            if isinstance(m, torch.nn.Linear)}
    got = merged_weights(fmt, path, setup["model"])
    assert set(deltas) <= set(got)
    for name, d in deltas.items():
        assert torch.allclose(got[name] - base[name], d, atol=atol, rtol=1e-4), name
    for name in set(got) - set(deltas):  # untouched layers (lm_head) stay W0
        assert torch.equal(got[name], base[name]), name
    loaded = load_model(str(path)) if fmt == "full" else load_adapter(load_model(setup["model"]), str(path))
    assert torch.allclose(logits(loaded), logits(reference_model(setup["model"], deltas)), atol=1e-4, rtol=1e-4)


def run_cli(*args: str) -> None:
    from flylora.cli import main

    assert main(["merge", *args]) == 0


CASES = [  # (method, hand formula, extra CLI args, hand kwargs)
    ("weight_average", "weight_average", [], {}),
    ("task_arithmetic", "task_arithmetic", ["--weights", "1,-0.5,2"], {"weights": [1, -0.5, 2]}),
    ("ties", "ties", ["--density", "0.3"], {"density": 0.3}),
    ("knots", "knots_mean", ["--knots-merge", "mean"], {}),
    ("knots", "knots_ties", ["--density", "0.4"], {"density": 0.4}),
    ("dare", "dare_dense", ["--density", "1.0"], {}),
    ("legacy_average", "legacy_dense", ["--legacy-form", "dense"], {}),
]


# separate averaging of LoRA factors needs equal ranks and scales, which the LoRA fixtures lack
PARAMS = [(kind, *c) for kind in ("lora", "flylora") for c in CASES if not (kind == "lora" and c[0] == "legacy_average")]


@pytest.mark.parametrize("kind, method, formula, extra, kw", PARAMS, ids=[f"{p[0]}-{p[2]}" for p in PARAMS])
def test_every_merge_equals_its_hand_formula(setup, tmp_path, kind, method, formula, extra, kw):
    tasks = hand_factors(kind, setup[kind], setup["model"])
    deltas = expected(formula, tasks, **kw)
    for fmt in ("adapter", "full"):
        out = tmp_path / fmt
        run_cli(*setup[kind], "--method", method, "--out", str(out), "--format", fmt, *extra)
        info = json.loads((out / "merge.json").read_text())
        assert info["method"] == method and info["format"] == fmt and len(info["inputs"]) == T
        check_against_hand(setup, out, fmt, deltas)


def test_linear_merge_adapter_has_the_concatenated_rank(setup, tmp_path):
    run_cli(*setup["lora"], "--method", "weight_average", "--out", str(tmp_path / "avg"))
    cfg = json.loads((tmp_path / "avg" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 + 2 + 4 and cfg["lora_alpha"] == cfg["r"]


def test_dare_is_seeded_drop_and_rescale(setup, tmp_path):
    tasks = hand_factors("lora", setup["lora"][:1], setup["model"])
    for seed in ("0", "0", "1"):
        out = tmp_path / f"dare{seed}-{len(list(tmp_path.iterdir()))}"
        run_cli(setup["lora"][0], "--method", "dare", "--density", "0.5", "--seed", seed, "--out", str(out))
    outs = sorted(tmp_path.iterdir())
    base = merged_weights("full", outs[0], setup["model"])
    w0 = merged_weights("full", Path(setup["model"]), setup["model"])
    same = merged_weights("full", outs[1], setup["model"])
    other = merged_weights("full", outs[2], setup["model"])
    kept = total = 0
    for mod, f in tasks[0].items():
        got, tau = base[mod] - w0[mod], dW(f)
        dropped = got.abs() < 1e-6
        assert torch.allclose(got[~dropped], tau[~dropped] / 0.5, atol=1e-5, rtol=1e-4), mod  # rescaled by 1/p
        kept += int((~dropped).sum())
        total += got.numel()
        assert torch.equal(base[mod], same[mod])  # same seed, same masks
    assert 0.4 < kept / total < 0.6
    assert any(not torch.equal(base[m], other[m]) for m in tasks[0])  # another seed, other masks


def _layer_output_by_hand(x, W0, tasks, weights, mod):
    """W0 x + Σ_i w_i s_i B_i (top-k(A_i x + d_i) mask ⊙ A_i x), signed top-k (the default)."""
    y = x @ W0.T
    for w, t in zip(weights, tasks):
        s, B, A, d, k = t[mod]
        a = x @ A.T
        idx = (a + d).topk(k, dim=-1).indices
        mask = torch.zeros_like(a).scatter_(-1, idx, 1.0)
        y = y + w * s * (a * mask) @ B.T
    return y


def test_routed_union_keeps_each_tasks_routing(setup, tmp_path):
    from flylora.merge import load_routed_union
    from flylora.models import load_model

    out = tmp_path / "union"
    run_cli(*[f"t{i}={p}" for i, p in enumerate(setup["flylora"])], "--method", "routed_union",
            "--weights", "0.5,-1,2", "--out", str(out))
    manifest = json.loads((out / "routed_union.json").read_text())
    assert manifest["tasks"] == ["t0", "t1", "t2"] and manifest["weights"] == [0.5, -1.0, 2.0]
    assert manifest["method"] == "routed_union" and manifest["peft_type"] == "FLYLORA"
    model = load_routed_union(load_model(setup["model"]), str(out))
    assert sorted(model.active_adapters) == ["t0", "t1", "t2"]
    layer = dict(model.get_base_model().named_modules())[MODULE]
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
    tasks = hand_factors("flylora", setup["flylora"], setup["model"])
    with torch.no_grad():
        got = layer(x)
    want = _layer_output_by_hand(x, layer.base_layer.weight.detach(), tasks, [0.5, -1, 2], MODULE)
    assert torch.allclose(got, want, atol=1e-5)
    # routing matters: the dense (all-experts) sum is a different function
    dense = x @ layer.base_layer.weight.detach().T + sum(
        w * x @ dW(t[MODULE]).float().T for w, t in zip([0.5, -1, 2], tasks))
    assert not torch.allclose(got, dense, atol=1e-3)


def test_routed_union_of_one_task_is_that_adapter_bit_for_bit(setup, tmp_path):
    from flylora.loading import load_adapter
    from flylora.merge import load_routed_union
    from flylora.models import load_model

    out = tmp_path / "one"
    run_cli(setup["flylora"][1], "--method", "routed_union", "--out", str(out))
    assert json.loads((out / "routed_union.json").read_text())["weights"] == [1.0]
    union = load_routed_union(load_model(setup["model"]), str(out))
    single = load_adapter(load_model(setup["model"]), setup["flylora"][1]).eval()
    assert torch.equal(logits(union), logits(single))
    a = load_file(str(Path(setup["flylora"][1]) / "adapter_model.safetensors"))
    sub = next(p for p in out.iterdir() if p.is_dir())
    b = load_file(str(sub / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_legacy_average_routed_reproduces_the_official_merge(setup, tmp_path):
    """Official merge_lora_adapters.py: Ā, B̄, d̄ averaged separately, and the result still routes
    top-k over (Ā x + d̄). Our routed legacy output must load to exactly that layer."""
    from flylora.loading import load_adapter
    from flylora.models import load_model

    out = tmp_path / "legacy"
    run_cli(*setup["flylora"], "--method", "legacy_average", "--out", str(out))
    model = load_adapter(load_model(setup["model"]), str(out))
    tasks = hand_factors("flylora", setup["flylora"], setup["model"])
    layers = dict(model.get_base_model().named_modules())
    for mod in tasks[0]:
        layer = layers[mod]
        A_bar = torch.stack([t[mod][2] for t in tasks]).mean(0)
        B_bar = torch.stack([t[mod][1] for t in tasks]).mean(0)
        d_bar = torch.stack([t[mod][3] for t in tasks]).mean(0)
        assert torch.allclose(layer.flylora_A["default"], A_bar, atol=1e-7)
        assert torch.allclose(layer.flylora_B["default"], B_bar, atol=1e-7)
        assert torch.allclose(layer.flylora_bias["default"], d_bar, atol=1e-7)
        assert layer.k["default"] == 2  # still routed
    x = torch.randn(4, layers[MODULE].in_features, generator=torch.Generator().manual_seed(2))
    s = tasks[0][MODULE][0]
    avg = [(s, torch.stack([t[MODULE][1] for t in tasks]).mean(0), torch.stack([t[MODULE][2] for t in tasks]).mean(0),
            torch.stack([t[MODULE][3] for t in tasks]).mean(0), 2)]
    with torch.no_grad():
        got = layers[MODULE](x)
    want = _layer_output_by_hand(x, layers[MODULE].base_layer.weight.detach(), [{MODULE: avg[0]}], [1.0], MODULE)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--method", "task_arithmetic"], "task_arithmetic needs --weights"),
    (["--method", "task_arithmetic", "--weights", "1,2"], "--weights has 2 values for 3 adapters"),
    (["--method", "weight_average", "--weights", "1,1,1"], "--weights does not apply to weight_average"),
    (["--method", "routed_union", "--format", "full"], "routed_union keeps input-dependent routing"),
    (["--method", "ties", "--weights", "1,x,2"], "--weights: expected comma-separated numbers"),
])
def test_bad_merge_options_are_one_line_errors(setup, tmp_path, capsys, args, message):
    from flylora.cli import main

    assert main(["merge", *setup["flylora"], "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()


def test_routed_methods_refuse_delta_merges_with_a_pointer(setup, tmp_path, capsys):
    from peft import get_peft_model

    import flylora
    from flylora.cli import main
    from flylora.models import load_model

    paths = []
    for i in range(2):
        m = get_peft_model(load_model(setup["model"]), flylora.SplitLoraConfig(r=8, num_experts=4))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "splitlora_" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
        m.peft_config["default"].base_model_name_or_path = setup["model"]
        m.save_pretrained(str(tmp_path / f"s{i}"))
        paths.append(str(tmp_path / f"s{i}"))
    assert main(["merge", *paths, "--method", "weight_average", "--out", str(tmp_path / "o")]) == 2
    assert "SPLITLORA adapters have an input-dependent router" in capsys.readouterr().err
    # the routed union keeps every task's router: one task in it is that adapter, bit for bit
    from flylora.loading import load_adapter
    from flylora.merge import load_routed_union

    run_cli(paths[0], "--method", "routed_union", "--out", str(tmp_path / "u"))
    union = load_routed_union(load_model(setup["model"]), str(tmp_path / "u"))
    single = load_adapter(load_model(setup["model"]), paths[0]).eval()
    assert torch.equal(logits(union), logits(single))
    assert not torch.allclose(logits(single), logits(load_model(setup["model"])), atol=1e-3)  # not a no-op
    run_cli(*paths, "--method", "legacy_average", "--out", str(tmp_path / "legacy"))  # tensor-wise, as official
    a, b = (load_file(f"{p}/adapter_model.safetensors") for p in paths)
    merged = load_file(str(tmp_path / "legacy" / "adapter_model.safetensors"))
    assert all(torch.allclose(merged[k], (a[k] + b[k]) / 2) for k in a)


def test_analyze_writes_json_and_plots(setup, tmp_path):
    out = tmp_path / "avg"
    run_cli(*[f"t{i}={p}" for i, p in enumerate(setup["flylora"])], "--method", "weight_average", "--out", str(out),
            "--analyze", "--analysis-prompts", "4", "--task", "t0=glue:sst2", "--task", "t1=commonsense:boolq",
            "--task", "t2=glue:sst2")
    rep = json.loads((out / "analysis" / "interference.json").read_text())
    assert rep["tasks"] == ["t0", "t1", "t2"]
    cos = torch.tensor(rep["cosines"]["mean_matrix"])
    assert torch.allclose(cos.diagonal(), torch.ones(3), atol=1e-6)
    # independent sparse Gaussian A's: ‖A_iA_jᵀ‖_F near Theorem 3.4's p/(r√n)
    assert 0.6 < rep["cross_projection"]["mean_ratio_to_prediction"] < 1.4
    for name in ("t0", "t1", "t2"):
        assert 0.0 <= rep["cka"][name]["last_layer"] <= 1.0 + 1e-9 and len(rep["cka"][name]["per_layer"]) == 3
        assert 0.0 < rep["routing"][name]["single"]["normalised_entropy_mean"] <= 1.0
    for png in ("cosine_heatmap.png", "cross_projection.png"):
        assert (out / "analysis" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
