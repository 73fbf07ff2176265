"""The shared battery: every method case in tests/cases.py through the same checks of PEFT's
adapter semantics (PEFT's own pattern: a table of cases, one set of tests)."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import PeftModel

from cases import CASES
from helpers import build, make_inputs, make_model, output_of, perturb, run_child, tuner_layers

ids = [c.name for c in CASES]
parametrize = pytest.mark.parametrize("case", CASES, ids=ids)


@parametrize
def test_init_equals_base(case):
    """B = 0 at init ⇒ W0 x + (α/r)·B(...) = W0 x: the adapted model starts as the base model."""
    if not case.init_equals_base:
        pytest.skip("method does not start at the base model")
    inputs = make_inputs(case.model)
    with torch.no_grad():
        ref = output_of(make_model(case.model), inputs)
        got = output_of(build(case).eval(), inputs)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@parametrize
def test_only_intended_tensors_train(case):
    """Three AdamW steps change exactly the declared trainable tensors; every other parameter and
    every buffer (frozen projections, routing biases) stays bit-identical."""
    model = build(case).train()
    before_p = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_b = {n: b.detach().clone() for n, b in model.named_buffers()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(f".{t}." in n for t in case.trainable) for n in trainable), trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = make_inputs(case.model)
    for _ in range(3):
        out = output_of(model, inputs)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before_p[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before_p[n]), f"{n} changed but is not trainable"
    for n, b in model.named_buffers():
        assert torch.equal(b, before_b[n]), f"buffer {n} changed without its update rule"


@pytest.fixture(scope="module")
def fresh_process_roundtrip(tmp_path_factory):
    """Save every case's (perturbed) adapter, then load them all in ONE new process."""
    root = tmp_path_factory.mktemp("roundtrip")
    expected = {}
    for case in CASES:
        model = build(case).eval()
        perturb(model)
        model.save_pretrained(root / case.name)
        with torch.no_grad():
            out = output_of(model, make_inputs(case.model))
        buffers = {n: b.clone() for n, b in model.named_buffers() if "_A." in n}
        expected[case.name] = {"out": out, "buffers": buffers}
    run_child("roundtrip_child.py", str(root))
    return {c.name: (expected[c.name], torch.load(root / c.name / "child.pt")) for c in CASES}


@parametrize
def test_save_load_fresh_process(case, fresh_process_roundtrip):
    """save_pretrained → PeftModel.from_pretrained in a new process gives bit-identical outputs and
    frozen projections (A regenerated from the seed, or read from the file)."""
    mine, child = fresh_process_roundtrip[case.name]
    assert not torch.allclose(mine["out"], output_of(make_model(case.model), make_inputs(case.model)))
    torch.testing.assert_close(child["out"], mine["out"], atol=0, rtol=0)
    assert mine["buffers"].keys() == child["buffers"].keys()
    for n in mine["buffers"]:
        assert torch.equal(mine["buffers"][n], child["buffers"][n]), n


@parametrize
def test_load_in_same_process_and_autopeft(case, tmp_path):
    model = build(case).eval()
    perturb(model)
    model.save_pretrained(tmp_path)
    inputs = make_inputs(case.model)
    with torch.no_grad():
        ref = output_of(model, inputs)
        loaded = PeftModel.from_pretrained(make_model(case.model), tmp_path).eval()
        torch.testing.assert_close(output_of(loaded, inputs), ref, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference must be frozen"
    trainable = PeftModel.from_pretrained(make_model(case.model), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@parametrize
def test_disable_set_delete_multiple_adapters(case):
    """disable_adapter() gives the base output; two adapters give different outputs; both active
    gives base + delta_1 + delta_2; deleting restores the other adapter's output."""
    inputs = make_inputs(case.model)
    base_out = output_of(make_model(case.model), inputs).detach()
    model = build(case).eval()
    perturb(model, "default", seed=1)
    model.add_adapter("other", case.config_cls(**case.kwargs))
    perturb(model, "other", seed=2)
    with torch.no_grad():
        model.set_adapter("default")
        out_a = output_of(model, inputs)
        with model.disable_adapter():
            torch.testing.assert_close(output_of(model, inputs), base_out, atol=case.atol, rtol=0)
        model.set_adapter("other")
        out_b = output_of(model, inputs)
        assert not torch.allclose(out_a, out_b)
        if case.model == "mlp":  # additive per-layer deltas add up in the output only for a one-layer path
            model.base_model.set_adapter(["default", "other"])
            lin1 = model.base_model.model.lin1
            x = torch.randn(4, 20)
            both = lin1(x)
            lin1.set_adapter("default")
            only_a = lin1(x)
            lin1.set_adapter("other")
            only_b = lin1(x)
            base = lin1.base_layer(x)
            torch.testing.assert_close(both, base + (only_a - base) + (only_b - base), atol=1e-5, rtol=1e-5)
        model.set_adapter("default")
        model.delete_adapter("other")
        assert "other" not in model.peft_config
        for layer in tuner_layers(model):
            assert "other" not in layer._all_available_adapter_names()
        torch.testing.assert_close(output_of(model, inputs), out_a, atol=0, rtol=0)


@parametrize
def test_mixed_batch_inference(case):
    """model(..., adapter_names=[...]) applies, row by row, the full method of that row's adapter."""
    model = build(case).eval()
    perturb(model, "default", seed=1)
    model.add_adapter("other", case.config_cls(**case.kwargs))
    perturb(model, "other", seed=2)
    inputs = make_inputs(case.model)
    n = next(iter(inputs.values())).shape[0]
    names = (["default", "other", "__base__"] * n)[:n]
    with torch.no_grad():
        mixed = output_of(model, {**inputs, "adapter_names": names})
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            if name == "__base__":
                with model.disable_adapter():
                    want = output_of(model, row)
            else:
                model.set_adapter(name)
                want = output_of(model, row)
            torch.testing.assert_close(mixed[i : i + 1], want, atol=1e-5, rtol=1e-5)
    model.train()
    with pytest.raises(ValueError, match="training"):
        output_of(model, {**inputs, "adapter_names": names})


@parametrize
def test_merge(case):
    """Where the method has a single ΔW, merge_and_unload equals the unmerged output; otherwise it
    refuses with a clear error instead of silently changing the function."""
    model = build(case).eval()
    perturb(model, std=0.1)
    inputs = make_inputs(case.model)
    with torch.no_grad():
        ref = output_of(model, inputs)
        if not case.mergeable:
            with pytest.raises(ValueError, match="cannot be merged"):
                model.merge_and_unload()
            return
        model.merge_adapter()
        torch.testing.assert_close(output_of(model, inputs), ref, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(output_of(model, inputs), ref, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        assert not tuner_layers(merged)
        torch.testing.assert_close(output_of(merged, inputs), ref, atol=1e-4, rtol=1e-4)


@parametrize
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_forward(case, dtype):
    """The adapted model runs in fp32 and bf16 (and under bf16 autocast) with finite outputs close
    to the fp32 result."""
    model = build(case).eval()
    perturb(model, std=0.1)
    inputs = make_inputs(case.model)
    with torch.no_grad():
        ref = output_of(model, inputs).float()
        low = copy.deepcopy(model).to(dtype)
        got = output_of(low, inputs)
        assert torch.isfinite(got).all()
        rel = ((got.float() - ref).norm() / ref.norm()).item()
        # bf16 rounding of A x can flip near-tied top-k choices, so routed methods get a looser bound
        bound = 1e-6 if dtype == torch.float32 else (0.05 if case.mergeable else 0.25)
        assert rel <= bound, rel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(output_of(model, inputs).float()).all()


@parametrize
def test_gradient_reaches_layer_input(case):
    """The adapter path carries gradient to its input (the official FlyLoRA computes A x under
    no_grad, so earlier layers only ever see W0's gradient)."""
    model = build(case).train()
    perturb(model)
    layer = tuner_layers(model)[0]
    x = torch.randn(5, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    with_adapter = x.grad.clone()
    x.grad = None
    layer.base_layer(x).sum().backward()
    assert not torch.allclose(with_adapter, x.grad), "no gradient through the adapter path"


@pytest.mark.parametrize("case", [c for c in CASES if c.model == "llama"], ids=[c.name for c in CASES if c.model == "llama"])
def test_modules_to_save(case, tmp_path):
    """modules_to_save trains a full copy of a module and saves it with the adapter."""
    model = build(case, modules_to_save=["lm_head"]).train()
    assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert any("lm_head" in k for k in load_file(os.path.join(tmp_path, "adapter_model.safetensors")))


@parametrize
def test_bad_targets_and_wrong_base(case, tmp_path):
    """Targets matching nothing, and an adapter loaded onto a base of other shapes, fail clearly."""
    with pytest.raises(ValueError, match="not found"):
        build(case, target_modules=["no_such_module"])
    model = build(case)
    model.save_pretrained(tmp_path)
    import flylora

    other = make_model(case.model)
    for layer in other.modules():  # same names, different shapes
        if isinstance(layer, torch.nn.Linear):
            layer.weight = torch.nn.Parameter(torch.zeros(layer.out_features + 2, layer.in_features))
            layer.out_features += 2
    with pytest.raises(ValueError, match="different shapes|does not fit"):
        flylora.load_adapter(other, str(tmp_path))
