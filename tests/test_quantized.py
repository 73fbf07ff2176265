"""Every method on a bitsandbytes 4-bit (nf4, fp4) and 8-bit (int8) base, on CPU (flylora.quantization).

For each tiny-llama case of tests/cases.py: f(x) = Q(W0) x + delta(x), with delta exactly the one the
method computes on the float base; FlyLoRA's A stays a float buffer with p nonzeros per row; only
adapter tensors train and Q(W0) does not move; routing counts are taken; save/load is exact;
merging is refused (k < r: no single ΔW; otherwise: W0 is quantized)."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

import flylora
from cases import CASES
from flylora.models import load_model
from flylora.quantization import prepare_for_training, quantized_kind
from flylora.tuners.base import AdapterLinear
from helpers import perturb

LLAMA_CASES = [c for c in CASES if c.model == "llama"]
QUANTS = ["nf4", "int8"]
GRID = [pytest.param(c, q, id=f"{c.name}-{q}") for q in QUANTS for c in LLAMA_CASES]
GRID.append(pytest.param(LLAMA_CASES[0], "fp4", id=f"{LLAMA_CASES[0].name}-fp4"))  # the official loading


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama with in_features >= 64: bitsandbytes' CPU eval kernel packs 4-bit weights
    in blocks of 64 input features (a 32-wide layer fails inside bitsandbytes)."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-q")
    LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128)).save_pretrained(path)
    return str(path)


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    return ids, mask


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


@pytest.mark.parametrize("case, quant", GRID)
def test_output_is_the_quantized_base_plus_our_delta(base_dir, case, quant):
    """Per adapted layer: layer(x) == Q(W0)(x) + Σ_a delta_a(x) bit for bit, and delta_a(x) equals the
    delta of the same adapter tensors on the float base, bit for bit."""
    fp = get_peft_model(load_model(base_dir), case.config_cls(**case.kwargs))
    perturb(fp)
    q = get_peft_model(load_model(base_dir, quantization=quant), case.config_cls(**case.kwargs))
    set_peft_model_state_dict(q, get_peft_model_state_dict(fp))
    fp.eval(), q.eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for (name, lf), (_, lq) in zip(layers(fp), layers(q)):
            assert quantized_kind(lq.get_base_layer()) is not None, name
            x = torch.randn(2, 5, lf.in_features, generator=g)
            delta_q = sum(lq.adapter_delta(x, a) for a in lq.active_adapters)
            delta_f = sum(lf.adapter_delta(x, a) for a in lf.active_adapters)
            assert torch.equal(delta_q, delta_f), name
            assert torch.equal(lq(x), lq.get_base_layer()(x) + delta_q.to(torch.float32)), name
        ids, mask = inputs()
        assert torch.isfinite(q(input_ids=ids, attention_mask=mask).logits).all()


@pytest.mark.parametrize("case, quant", GRID)
def test_training_step_moves_only_adapter_tensors(base_dir, case, quant):
    """As `flylora train` builds it (prepare_model_for_kbit_training, then the adapter): the trainable
    tensors are exactly the method's adapter tensors, a step changes them and leaves Q(W0) alone,
    FlyLoRA's A is an fp32 buffer with p nonzeros per row (the float base's A), and the routing counts
    are k per non-padding token."""
    kwargs = dict(case.kwargs)
    if case.config_cls in (flylora.FlyLoraConfig, flylora.LoraFaConfig):
        kwargs.setdefault("projection_seed", 21)  # the same A on the float base below
    model = prepare_for_training(load_model(base_dir, quantization=quant), False, False)
    model = get_peft_model(model, case.config_cls(**kwargs)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(f".{t}." in n for t in case.trainable) for n in trainable)
    frozen = {n: m.get_base_layer().weight.data.clone() for n, m in layers(model)}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, mask = inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for n, lay in layers(model):
        if isinstance(lay, flylora.FlyLoraModel.layer_cls) and lay.k["default"] < lay.r["default"]:
            # each of the 3·7 − 2 = 19 real tokens picks k experts once
            assert float(lay.pending_counts["default"].sum()) == lay.k["default"] * 19, n
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    for n, m in layers(model):
        assert torch.equal(m.get_base_layer().weight.data, frozen[n]), n
        assert not m.get_base_layer().weight.requires_grad
    if case.config_cls in (flylora.FlyLoraConfig, flylora.LoraFaConfig):
        fp = get_peft_model(load_model(base_dir), case.config_cls(**kwargs))
        for (n, lq), (_, lf) in zip(layers(model), layers(fp)):
            A = lq.flylora_A["default"]
            p = round((case.kwargs.get("sparsity") or lq.k["default"] / lq.r["default"]) * lq.in_features)
            assert A.dtype == torch.float32 and n not in dict(model.named_parameters())
            assert ((A != 0).sum(dim=1) == p).all(), n
            assert torch.equal(A, lf.flylora_A["default"]), n


@pytest.mark.parametrize("case, quant", GRID)
def test_save_load_is_exact(base_dir, tmp_path, case, quant):
    model = get_peft_model(load_model(base_dir, quantization=quant), case.config_cls(**case.kwargs))
    perturb(model)
    model.eval()
    ids, mask = inputs()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == case.config_cls.method_name
    again = PeftModel.from_pretrained(load_model(base_dir, quantization=quant), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, want)
    a, b = get_peft_model_state_dict(model), get_peft_model_state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case, quant", GRID)
def test_merge_is_refused_and_leaves_the_model_unchanged(base_dir, case, quant):
    """k < r (and the other routed methods): no single ΔW. A mergeable adapter (k = r, LoRA-FA): refused
    because W0 is quantized (requantizing W0 + ΔW rounds the update away; flylora.quantization)."""
    model = get_peft_model(load_model(base_dir, quantization=quant), case.config_cls(**case.kwargs))
    perturb(model)
    model.eval()
    ids, mask = inputs()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(ValueError) as e:
        model.merge_and_unload()
    msg = str(e.value)
    assert "\n" not in msg
    if case.mergeable:
        assert "W0 is quantized" in msg and "quantization none" in msg
        name, layer = layers(model)[0]
        with pytest.raises(ValueError, match="W0 is quantized"):
            layer.merge()
    else:
        assert "cannot be merged" in msg
    assert not any(m.merged for _, m in layers(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)


def test_bad_quantization_values_are_one_line(tmp_path):
    from flylora.pipeline.recipe import load_recipe

    with pytest.raises(ValueError, match=r"recipe.model.quantization: 'int4' is not allowed \(allowed: none, nf4"):
        load_recipe({"model": {"quantization": "int4"}})
    with pytest.raises(ValueError, match="apply to 4-bit bases"):
        load_recipe({"model": {"quantization": "int8", "double_quant": True}})
    with pytest.raises(ValueError, match="recipe.model.compute_dtype: 'fp8' is not allowed"):
        load_recipe({"model": {"quantization": "nf4", "compute_dtype": "fp8"}})


def test_bitsandbytes_notices_are_dropped_and_nothing_else(caplog):
    """`import flylora` filters exactly bitsandbytes' optional-kernel notice and its per-call int8 cast
    notice (flylora.quantization); other messages of those loggers still pass."""
    import logging

    cpu, autograd = logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING):
        cpu.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        autograd.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        cpu.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


@pytest.mark.slow
def test_flylora_train_and_eval_on_a_4bit_base(tmp_path):
    """`flylora train` with model.quantization=fp4 (the paper recipes' loading), then `flylora eval
    --quantization fp4` on the adapter: run.json records it and the evaluation runs."""
    from pipeline_child import tiny_recipe
    from transformers import LlamaConfig, LlamaForCausalLM

    from flylora.cli import main
    from flylora.models import load_tokenizer
    from flylora.pipeline.train import train

    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    recipe = tiny_recipe(str(model_dir), str(tmp_path / "run"),
                         model={"quantization": "fp4", "compute_dtype": "float32", "dtype": "bfloat16"},
                         train={"max_steps": 2, "gradient_checkpointing": True})
    run_dir = train(recipe)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["model"]["quantization"] == "fp4" and info["train"]["global_step"] == 2
    out = tmp_path / "eval"
    assert main(["eval", "-t", "glue:sst2", "--split", "carved-test", "--limit", "4", "--mode", "loglik",
                 "-m", str(model_dir), "-a", str(run_dir / "adapter"), "--quantization", "fp4",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["quantization"] == "fp4" and res["results"][0]["n"] == 4


def test_bench_counts_the_4bit_quantization_constants(base_dir):
    """`flylora bench --quantized` adds the 4-bit layers' absmax (one fp32 per 64 weights) and code
    tables to the live base state; an int8 or float base has none."""
    from flylora.bench.quant import quant_state_bytes

    model = load_model(base_dir, quantization="nf4")
    qlayers = [m for m in model.modules() if quantized_kind(m)]
    absmax = sum(m.weight.quant_state.absmax.numel() * 4 for m in qlayers)
    assert absmax == sum(m.in_features * m.out_features for m in qlayers) // 64 * 4
    assert absmax < quant_state_bytes(model) <= absmax + 16 * 4 * len(qlayers)  # + the shared 16-entry code
    assert quant_state_bytes(load_model(base_dir)) == 0
