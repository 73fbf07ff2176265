"""Official FlyLoRA checkpoints (gfyddha/FlyLoRA's PEFT fork) <-> flylora adapters (issue 12).

The fixture is built here from the format the authors' fork saves (flylora.md §8): per module
`base_model.model.<m>.lora_A.weight` (r, n) dense with p = n // (r // k) nonzeros per row drawn as
`torch.randperm(n)[:p]`, values N(0, 1/r²); `lora_B.weight` (m, r); `lora_topk_bias` (r,); and the
fork's LoraConfig with "peft_type": "LORA", "init_lora_weights": "sparse", "top_k", "bias_u".
The official forward, written out here from their lora/layer.py:
    y = A x;  I = top-k(y + d) (signed);  out = W0 x + (α/r) · B (mask_I ⊙ y)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import flylora.tuners  # noqa: F401  (registers the methods)
from helpers import perturb

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "tasks"))
from tiny_lm import save_tiny_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("official-base"))


def _base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()


def _inputs():
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def official_checkpoint(base_dir, out: Path, r: int = 8, k: int = 2, alpha: float = 16, **cfg_edits) -> dict:
    """Write an official-format checkpoint for the tiny base; returns its tensors."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, mod in _base(base_dir).named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            n, m = mod.in_features, mod.out_features
            p = n // (r // k)  # the fork's reset_lora_parameters("sparse")
            mask = torch.zeros(r, n, dtype=torch.bool)
            for i in range(r):
                mask[i, torch.randperm(n, generator=g)[:p]] = True
            A = torch.randn(r, n, generator=g) / r * mask
            tensors[f"base_model.model.{name}.lora_A.weight"] = A
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m, r, generator=g) * 0.3  # "trained"
            tensors[f"base_model.model.{name}.lora_topk_bias"] = torch.randn(r, generator=g) * 0.05
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "init_lora_weights": "sparse", "top_k": k, "bias_u": 0.001, "r": r,
           "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": TARGETS, "task_type": "CAUSAL_LM",
           "base_model_name_or_path": str(base_dir), "use_dora": False, "use_rslora": False,
           "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "bias": "none",
           "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True}
    cfg.update(cfg_edits)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return tensors


class OfficialLinear(nn.Module):
    """The fork's lora.Linear forward (FlyLoRA branch), without its in-forward bias update."""

    def __init__(self, base, A, B, d, k, scaling):
        super().__init__()
        self.base, self.A, self.B, self.d, self.k, self.scaling = base, A, B, d, k, scaling

    def forward(self, x):
        y = x @ self.A.T  # activations = lora_A(x)
        _, idx = torch.topk(y + self.d.unsqueeze(0), self.k, dim=-1)  # signed, no .abs()
        mask = torch.zeros_like(y).scatter_(-1, idx, 1.0)
        return self.base(x) + ((y * mask) @ self.B.T) * self.scaling  # lora_B(activations * mask) * scaling


def official_model(base_dir, tensors: dict, k: int, scaling: float):
    model = _base(base_dir)
    for name, mod in list(model.named_modules()):
        key = f"base_model.model.{name}"
        if f"{key}.lora_A.weight" in tensors:
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, OfficialLinear(
                mod, tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"],
                tensors[f"{key}.lora_topk_bias"], k, scaling))
    return model.eval()


# ------------------------------------------------------------------------------ official -> flylora
@pytest.mark.parametrize("r, k, alpha, atol", [(8, 2, 16, 0.0), (8, 3, 12, 1e-5)],
                         ids=["alpha/r=2 (bit-identical)", "r%k!=0, alpha/r=1.5"])
def test_from_official_equals_the_official_forward(base_dir, tmp_path, r, k, alpha, atol):
    """Converted, the adapter's logits equal the official forward (every loading path) and A is
    kept bit for bit; r % k != 0 gives the fork's p = n // (r // k), covered by one sparsity."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flylora.cli import main as cli_main

    tensors = official_checkpoint(base_dir, tmp_path / "official", r=r, k=k, alpha=alpha)
    assert cli_main(["convert", "--from", "official", str(tmp_path / "official"), "--out", str(tmp_path / "ours")]) == 0
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    got = (cfg["peft_type"], cfg["r"], cfg["k"], cfg["topk_on"], cfg["save_projection"])
    assert got == ("FLYLORA", r, k, "signed", True)
    assert cfg["bias_update_rate"] == 0.001
    x = _inputs()
    with torch.no_grad():
        want = official_model(base_dir, tensors, k, alpha / r)(**x).logits
        assert (want - _base(base_dir)(**x).logits).abs().max() > 1e-2
        ours = PeftModel.from_pretrained(_base(base_dir), str(tmp_path / "ours")).eval()
        native = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()  # transformers' loader
        for model in (ours, native):
            assert (model(**x).logits - want).abs().max().item() <= atol
    for name, layer in ours.named_modules():
        if isinstance(layer, flylora.tuners.FlyLoraLayer):
            assert torch.equal(layer.flylora_A["default"], tensors[f"{name}.lora_A.weight"])
            assert torch.equal(layer.flylora_bias["default"], tensors[f"{name}.lora_topk_bias"])


def test_round_trip_back_to_official_is_bit_identical(base_dir, tmp_path):
    from flylora.interop.official import from_official, to_official

    tensors = official_checkpoint(base_dir, tmp_path / "official")
    from_official(tmp_path / "official", tmp_path / "ours")
    to_official(tmp_path / "ours", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    got = (cfg["peft_type"], cfg["init_lora_weights"], cfg["top_k"], cfg["bias_u"], cfg["r"])
    assert got == ("LORA", "sparse", 2, 0.001, 8)


@pytest.mark.parametrize("method, save_projection", [("flylora", False), ("flylora", True), ("lora_fa", False)])
def test_to_official_runs_like_our_adapter(base_dir, tmp_path, method, save_projection):
    """A flylora adapter written in the official layout (A regenerated from the seed, or from the
    saved sparse form; LoRA-FA as top_k = r) gives, under the official forward, our logits."""
    from peft import PeftModel, get_peft_model

    from flylora.cli import main as cli_main

    if method == "lora_fa":
        cfg = flylora.tuners.LoraFaConfig(r=8, lora_alpha=16, projection_seed=9)
    else:
        cfg = flylora.tuners.FlyLoraConfig(r=8, k=2, lora_alpha=16, projection_seed=9, save_projection=save_projection)
    model = get_peft_model(_base(base_dir), cfg)
    perturb(model, std=0.3)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "flylora_bias" in name:
                buf.copy_(torch.randn(buf.shape) * 0.05)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(str(tmp_path / "ours"))
    assert cli_main(["convert", "--to", "official", str(tmp_path / "ours"), "--out", str(tmp_path / "official")]) == 0
    tensors = load_file(str(tmp_path / "official" / "adapter_model.safetensors"))
    x = _inputs()
    with torch.no_grad():
        want = PeftModel.from_pretrained(_base(base_dir), str(tmp_path / "ours")).eval()(**x).logits
        got = official_model(base_dir, tensors, cfg.k, 2.0)(**x).logits
    assert (got - want).abs().max().item() == 0.0


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("edit, words", [
    ({"use_dora": True}, "DoRA"),
    ({"use_rslora": True}, "use_rslora"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_from_official_refuses_what_has_no_equivalent(base_dir, tmp_path, capsys, edit, words):
    from flylora.cli import main as cli_main

    official_checkpoint(base_dir, tmp_path / "official", **edit)
    capsys.readouterr()
    assert cli_main(["convert", "--from", "official", str(tmp_path / "official"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "no flylora FlyLoRA equivalent" in err[0]
    assert not (tmp_path / "o").exists()


def test_embedding_lora_is_refused(base_dir, tmp_path):
    from flylora.interop.official import from_official

    tensors = official_checkpoint(base_dir, tmp_path / "official")
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 10)
    save_file(tensors, str(tmp_path / "official" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="embedding LoRA"):
        from_official(tmp_path / "official", tmp_path / "o")


def test_to_official_refuses_abs_topk_and_other_methods(base_dir, tmp_path):
    from peft import get_peft_model

    from flylora.interop.official import to_official

    for name, cfg in {"abs": flylora.tuners.FlyLoraConfig(r=4, k=2, topk_on="abs"),
                      "top": flylora.tuners.TopLoraConfig(r=4)}.items():
        model = get_peft_model(_base(base_dir), cfg)
        model.save_pretrained(str(tmp_path / name))
    with pytest.raises(ValueError, match="topk_on='abs' has no official equivalent"):
        to_official(tmp_path / "abs", tmp_path / "o")
    with pytest.raises(ValueError, match="peft_type='TOPLORA' has no official FlyLoRA form"):
        to_official(tmp_path / "top", tmp_path / "o")


# ------------------------------------------------------------------------------ direct loads
def test_direct_loads_name_the_converter(base_dir, tmp_path, capsys):
    """PeftModel.from_pretrained, transformers' loader, flylora.load_adapter, `flylora eval -a` and
    `flylora merge` on an official checkpoint: one line naming `flylora convert --from official`
    (stock PEFT says `Unknown initialization init_lora_weights='sparse'`)."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from flylora.cli import main as cli_main
    from flylora.loading import OfficialCheckpointError, load_adapter

    src = tmp_path / "official"
    official_checkpoint(base_dir, src)
    hint = "flylora convert --from official"
    for load in (lambda: PeftModel.from_pretrained(_base(base_dir), str(src)),
                 lambda: AutoPeftModelForCausalLM.from_pretrained(str(src)),
                 lambda: AutoModelForCausalLM.from_pretrained(str(src)),
                 lambda: load_adapter(_base(base_dir), str(src))):
        with pytest.raises(OfficialCheckpointError, match=hint):
            load()
    for argv in (["eval", "-t", "mmlu", "--limit", "1", "-m", str(base_dir), "-a", str(src)],
                 ["merge", f"a={src}", f"b={src}", "-m", "weight_average", "-o", str(tmp_path / "m")]):
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not progress bars
        assert len(err) == 1 and "official FlyLoRA checkpoint" in err[0] and hint in err[0], err

    # edited to load as dense LoRA: stock PEFT then runs a different function (top-k and d dropped),
    # which is why the docs say not to; flylora's own loader still recognises the weights
    cfg = json.loads((src / "adapter_config.json").read_text())
    for key in ("top_k", "bias_u"):
        cfg.pop(key)
    cfg["init_lora_weights"] = True
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(OfficialCheckpointError, match=hint):
        load_adapter(_base(base_dir), str(src))


def test_to_official_checks_the_regenerated_projection(base_dir, tmp_path):
    """A regenerated from the seed must be the A that was saved (its recorded fingerprint): a
    mismatch (another torch / CPU kernel, or an edited config) is refused, not written."""
    from peft import get_peft_model

    from flylora.interop.official import to_official

    model = get_peft_model(_base(base_dir), flylora.tuners.FlyLoraConfig(r=4, k=2, projection_seed=1))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(str(tmp_path / "ours"))
    cfg_path = tmp_path / "ours" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["projection_fingerprint"].startswith("sha256:")
    to_official(tmp_path / "ours", tmp_path / "ok")  # the recorded fingerprint matches
    cfg["projection_fingerprint"] = "sha256:" + "0" * 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fingerprint"):
        to_official(tmp_path / "ours", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
