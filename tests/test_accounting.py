"""flylora.count_parameters on real model shapes, built on the meta device (nothing is materialised),
against the specs' tables and the per-method formulas (see flylora/accounting.py)."""
from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model

import flylora
from helpers import make_model

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# public configs: (builder, hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
SHAPES = {
    "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256, False),
    "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 128256, True),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-3b": ("qwen2", 2048, 11008, 36, 16, 2, 151936, True),
}
BASE_TOTALS = {"llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512}


def meta_model(name: str, config):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kind, d, ff, layers, heads, kv, vocab, tied = SHAPES[name]
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    with torch.device("meta"):
        base = model_cls(cfg_cls(
            hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
        ))  # fmt: skip
        model = get_peft_model(base, config)
    assert all(p.device.type == "meta" for p in model.parameters())
    return model


def dims(name: str, targets) -> tuple[int, int, int]:
    """(Σ n, Σ m, number of adapted linears) over the whole model for the given targets."""
    _, d, ff, layers, heads, kv, *_ = SHAPES[name]
    kvd = kv * d // heads
    shapes = {"q_proj": (d, d), "k_proj": (d, kvd), "v_proj": (d, kvd), "o_proj": (d, d),
              "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}  # fmt: skip
    return (layers * sum(shapes[t][0] for t in targets), layers * sum(shapes[t][1] for t in targets), layers * len(targets))


def test_lora_on_llama_3_1_8b_matches_the_spec_table():
    c8 = flylora.count_parameters(meta_model("llama-3.1-8b", LoraConfig(r=8, target_modules=ALL7)))
    assert c8["trainable"] == c8["activated"] == c8["stored"] == 20_971_520
    assert c8["base"] == BASE_TOTALS["llama-3.1-8b"] and c8["total"] == c8["base"] + 20_971_520
    assert round(c8["trainable_pct"], 3) == 0.261
    c32 = flylora.count_parameters(meta_model("llama-3.1-8b", LoraConfig(r=32, target_modules=ALL7)))
    assert c32["trainable"] == c32["activated"] == 83_886_080 and round(c32["trainable_pct"], 3) == 1.045


def test_flylora_on_llama_3_1_8b_matches_the_spec_table():
    c = flylora.count_parameters(meta_model("llama-3.1-8b", flylora.FlyLoraConfig(r=32, k=8)))
    assert c["trainable"] == 44_040_192 and c["activated"] == 11_010_048  # r·Σm and k·Σm
    assert round(c["activated_pct"], 3) == 0.137
    assert c["stored"] == 44_040_192 + 32 * 224 + 224  # B, the routing bias d and the seed; A comes from it
    assert c["by_tensor"] == {"flylora_B": 44_040_192}


def test_qwen2_5_7b_matches_the_spec_table():
    c = flylora.count_parameters(meta_model("qwen2.5-7b", LoraConfig(r=8, target_modules=ALL7)))
    assert c["trainable"] == 20_185_088 and c["base"] == BASE_TOTALS["qwen2.5-7b"]
    assert round(c["trainable_pct"], 3) == 0.265
    fly = flylora.count_parameters(meta_model("qwen2.5-7b", flylora.FlyLoraConfig(r=32, k=8)))
    assert fly["trainable"] == 44_498_944 and fly["activated"] == 11_124_736 and round(fly["activated_pct"], 3) == 0.146


def test_toplora_on_qwen2_5_3b_matches_the_spec_table():
    c = flylora.count_parameters(meta_model("qwen2.5-3b", flylora.TopLoraConfig(r=8)))
    sn, sm, L = dims("qwen2.5-3b", ["q_proj", "k_proj", "v_proj"])
    assert c["trainable"] == c["activated"] == c["stored"] == 4_277_088 == 8 * (2 * sn + sm + L)  # r(2n+m+1)


def test_moelora_on_llama_3_2_3b_matches_the_spec_table():
    c = flylora.count_parameters(meta_model("llama-3.2-3b", flylora.MoeLoraConfig(num_experts=20, expert_r=4, top_k=10)))
    assert c["trainable"] == c["stored"] == 52_756_480
    assert c["by_tensor"]["moelora_gate"] == 6_881_280
    sn, sm, _ = dims("llama-3.2-3b", ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert c["activated"] == 10 * 4 * (sn + sm) + 20 * sn == 29_818_880  # top_k·r_e(n+m) + E·n


def test_split_hydra_lorafa_adalora_follow_their_formulas():
    sn, sm, L = dims("llama-3.1-8b", ALL7)
    split = flylora.count_parameters(meta_model("llama-3.1-8b", flylora.SplitLoraConfig(r=32, num_experts=4, top_k=1)))
    assert split["trainable"] == 32 * (sn + sm) + 4 * sn == 88_866_816
    assert split["activated"] == 1 * 8 * (sn + sm) + 4 * sn == 25_952_256  # k·(r/N)(n+m) + N·n
    assert round(split["activated_pct"], 2) == 0.32  # the paper's Table 1 "Split-LoRA 4×8": 0.33

    hydra = flylora.count_parameters(meta_model("llama-3.1-8b", flylora.HydraLoraConfig(r=8, num_heads=3)))
    assert hydra["trainable"] == hydra["activated"] == 8 * sn + 3 * 8 * sm + 3 * sn  # r·n + N·r·m + N·n

    fa = flylora.count_parameters(meta_model("llama-3.1-8b", flylora.LoraFaConfig(r=32)))
    assert fa["trainable"] == fa["activated"] == 32 * sm and fa["stored"] == 32 * sm + 32 * L + L

    ada = flylora.count_parameters(
        meta_model("llama-3.1-8b", AdaLoraConfig(init_r=12, target_r=8, total_step=100, target_modules=ALL7))
    )
    assert ada["trainable"] == ada["activated"] == 12 * (sn + sm) + 12 * L  # A, B and λ at the initial rank
    assert ada["by_tensor"].keys() == {"lora_A", "lora_B", "lora_E"}


def test_modules_to_save_and_inactive_adapters():
    base_total = sum(p.numel() for p in make_model("llama").parameters())
    model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))  # inactive: stored, not trainable, no head
    c = flylora.count_parameters(model)
    head = 64 * 32
    q_lora = lambda r: 2 * r * (32 + 32)  # noqa: E731  (2 layers)
    assert c["base"] == base_total
    assert c["trainable"] == c["activated"] == q_lora(2) + head and c["by_tensor"]["other"] == head
    assert c["stored"] == q_lora(2) + head + q_lora(4)  # both adapters' files
    assert c["total"] == base_total + q_lora(2) + q_lora(4) + head


@pytest.mark.parametrize("save_projection", [False, True])
def test_flylora_stored_counts_the_sparse_projection_only_when_saved(save_projection):
    cfg = flylora.FlyLoraConfig(r=4, k=2, save_projection=save_projection, target_modules=["lin0"])
    model = get_peft_model(make_model("mlp"), cfg)
    c = flylora.count_parameters(model)
    assert c["trainable"] == 20 * 4 and c["activated"] == 20 * 2
    p = round(0.5 * 10)  # nonzeros per row of A
    assert c["stored"] == 20 * 4 + 4 + 1 + (2 * 4 * p if save_projection else 0)  # B, d, seed, (cols, vals)
