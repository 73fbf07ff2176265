"""benchmarks/gpu_check.py on CPU (`--device cpu --tiny`), so the prepared CUDA check cannot rot, plus
the CUDA-hot-path properties that can be checked without a GPU.

The tiny run goes through every section's code (parity, bf16 and 4-bit training, sync detection,
decode) on tiny models. Speed figures from it mean nothing and are only checked to be finite; the
checks are on what the code must compute: CPU-vs-CPU parity is exact, selections agree, the
FlyLoRA step has no CUDA-syncing op in flylora's own code, the guard skips instead of running over.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402
from gpucheck import syncs  # noqa: E402
from gpucheck.common import TINY, Device  # noqa: E402

pytestmark = pytest.mark.xdist_group("gpu_check")  # one module-scoped run, one worker


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--quiet"])
    return rc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_tiny_cpu_run_covers_every_section(tiny_run):
    rc, result, md = tiny_run
    assert rc == 0 and result["errors"] == {} and result["skipped"] == []
    assert list(result["sections"]) == ["parity", "training_bf16", "decode", "training_4bit"]
    for heading in ("### 1. Parity", "### 2. Training, bf16 base", "### 3. Routing-bias", "### 4. Decode"):
        assert heading in md
    assert result["settings"]["device_info"]["device"] == "cpu"


def test_parity_cpu_against_cpu_is_exact_and_selections_agree(tiny_run):
    """The same weights and tokens through the same code on the same device: bit-identical logits and
    B-gradients in fp32 (and run to run); under bf16/fp16 autocast the differences are rounding-sized
    and most (layer, token) expert sets are unchanged."""
    parity = tiny_run[1]["sections"]["parity"]
    assert set(parity["methods"]) == {"flylora_r32k8", "toplora_r8", "moelora_20x4_top10"}
    for method, r in parity["methods"].items():
        assert r["fp32"]["logits_max_abs_diff"] == 0.0 and r["fp32"]["b_grad_max_abs_diff"] == 0.0, method
        assert r["fp32_run_to_run"] == {"logits_max_abs_diff": 0.0, "b_grad_max_abs_diff": 0.0}
        assert r["ref_b_grad_max_abs"] > 0  # B gets a real gradient, so a zero difference means something
        for prec in ("bf16", "fp16"):
            assert 0 < r[prec]["logits_max_abs_diff"] < 0.1 * r["ref_logits_max_abs"], (method, prec)
        agree = r["fp32"]["selection_agreement"]
        if method == "toplora_r8":
            assert agree is None  # nothing is selected
        else:
            assert agree["exact_set"] == agree["slot"] == 1.0 and agree["routed_tokens"] > 0
            assert r["bf16"]["selection_agreement"]["slot"] > 0.9


def test_training_decode_and_bias_figures_are_finite(tiny_run):
    sec = tiny_run[1]["sections"]
    for key in ("training_bf16", "training_4bit"):
        t = sec[key]
        assert set(t["methods"]) == {"frozen_base", "flylora_r32k8", "lora_r8", "lora_r32"}, key
        assert all(_positive(v) for k, v in t["ratios"].items() if "step" in k), t["ratios"]
        assert all(r["steps"] == TINY.steps and _positive(r["tokens_per_s"]) for r in t["methods"].values())
        assert t["methods"]["frozen_base"]["trainable_params"] == 0
    bias = sec["training_bf16"]["methods"]["flylora_r32k8"]["bias_update"]
    assert 0 < bias["share_of_step"] < 1
    per = sec["decode"]["per_token_s"]
    assert all(_positive(per[m][f"batch={b}"]) for m in per for b in TINY.decode_batches)


def test_flylora_step_has_no_cuda_syncing_op_in_flylora_code(tiny_run):
    """The FlyLoRA training step (forward with top-k and counting, backward, AdamW, update_routing_bias)
    calls no op that would make the host wait on CUDA (.item(), nonzero, bincount, ...) from flylora's
    own code. The control run (LoRA r8) is attributed too, so the detector itself ran."""
    methods = tiny_run[1]["sections"]["training_bf16"]["methods"]
    for m in ("flylora_r32k8", "lora_r8"):
        prof = methods[m]["syncs"]["profiler"]
        assert prof["sync_ops_in_flylora_per_step"] == 0, prof["by_location"]
    assert methods["flylora_r32k8"]["syncs"]["debug_mode"]["available"] is False  # CUDA-only detector


def _tiny_flylora_step(**config):
    from conftest import make_model
    from peft import get_peft_model

    import flylora

    model = get_peft_model(make_model("llama"), flylora.FlyLoraConfig(r=8, k=2, projection_seed=0, **config)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        flylora.update_routing_bias(model)

    return model, step


def test_sync_detector_attributes_a_host_sync_in_flylora_code(monkeypatch):
    """The detector can fail: an .item() slipped into FlyLoRA's counting is found and attributed to
    the flylora file that made the call."""
    import flylora.tuners.flylora as tuner

    _, step = _tiny_flylora_step()
    step()
    assert syncs.profile_syncs(step, Device("cpu"), 1)["sync_ops_in_flylora_per_step"] == 0
    counts = tuner.index_counts

    def syncing_counts(*args):
        c = counts(*args)
        c.sum().item()  # what a careless "log the load" would add
        return c

    monkeypatch.setattr(tuner, "index_counts", syncing_counts)
    found = syncs.profile_syncs(step, Device("cpu"), 1)
    assert found["sync_ops_in_flylora_per_step"] == 14  # one per adapted layer (2 layers × 7 projections)
    assert any(k.startswith("flylora/tuners/flylora.py:") for k in found["by_location"]), found["by_location"]


def test_bias_update_with_mixed_rates_builds_no_tensor_from_host_data(monkeypatch):
    """update_routing_bias with adapters of different rates scales each group by a Python float:
    `torch.tensor(host_list, device=cuda)` would be a blocking copy, i.e. a host sync every step.
    The result is the per-layer rule d += u·sign(mean(c) − c) with each adapter's own u."""
    from peft import get_peft_model

    import flylora
    from conftest import make_model
    from flylora.layers.routing import loss_free_bias_update

    cfg = flylora.FlyLoraConfig(r=8, k=2, projection_seed=0, bias_update_rate=0.01)
    model = get_peft_model(make_model("llama"), cfg)
    model.add_adapter("two", flylora.FlyLoraConfig(r=8, k=2, projection_seed=1, bias_update_rate=0.003))
    model.base_model.set_adapter(["default", "two"])
    model.train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    layers = [m for _, m in flylora.balance.routed_layers(model)]
    want = {}
    for layer in layers:
        for name, c in layer.pending_counts.items():
            d = layer.flylora_bias[name].clone()
            loss_free_bias_update(d, c, layer.bias_update_rate[name])
            want[(id(layer), name)] = d
    assert len(want) == 2 * len(layers) and any(c.any() for lay in layers for c in lay.pending_counts.values())
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    assert flylora.update_routing_bias(model) == len(want)
    assert made == []
    for layer in layers:
        for name in layer.pending_counts:
            assert torch.equal(layer.flylora_bias[name], want[(id(layer), name)])


def test_fp16_selection_keeps_the_fp32_bias():
    """Selection adds d in fp32: with y in fp16 (autocast on CUDA gives an fp16 A x), bias
    differences far below fp16's resolution at |y| = 4 (ulp 2^-8) still decide the top-k."""
    from flylora.layers.routing import select_topk

    y = torch.full((3, 8), 4.0, dtype=torch.float16)  # all experts tie in fp16
    bias = torch.tensor([0, 5e-4, 1e-3, 0, 2e-3, 0, 0, 3e-4])  # 4 + 1e-3 rounds to 4 in fp16
    idx = select_topk(y, bias, k=3)
    assert idx.dtype == torch.int64 and {tuple(sorted(r)) for r in idx.tolist()} == {(1, 2, 4)}
    assert torch.equal(idx.sort(-1).values, select_topk(y.float(), bias, k=3).sort(-1).values)


def test_time_guard_skips_with_a_note(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--quiet", "--budget-s", "0.001"])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and result["sections"] == {}
    assert [s["what"] for s in result["skipped"]] == ["parity", "training_bf16", "decode", "training_4bit"]
    assert all(s["reason"].startswith("time guard:") for s in result["skipped"])
    assert "not measured" not in (tmp_path / "gpu_check.md").read_text()  # skips are listed, not invented


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_one_clear_line(capsys):
    assert gpu_check.main(["--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cpu --tiny" in err


def test_bad_sections_are_rejected(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "parity,warp"])
    assert "--sections 'parity,warp': unknown ['warp']" in capsys.readouterr().err


def test_a_failing_method_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """One GPU session may be all there is: a method that raises is recorded (type, message, frames),
    the section's other methods still run, and the exit status says something failed."""
    from gpucheck import decode

    real = decode.decode_method

    def flaky(base, method, *args):
        if method == "lora_r8":
            raise RuntimeError("injected failure")
        return real(base, method, *args)

    monkeypatch.setattr(decode, "decode_method", flaky)
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--quiet", "--sections", "decode"])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and list(result["errors"]) == ["decode/lora_r8"]
    assert result["errors"]["decode/lora_r8"]["error"] == "RuntimeError: injected failure"
    assert set(result["sections"]["decode"]["per_token_s"]) == {"frozen_base", "flylora_r32k8", "lora_r32"}
    assert result["sections"]["decode"]["ratios"]["flylora_r32k8_vs_lora_r8@batch=1"] is None
