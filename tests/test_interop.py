"""flylora adapters load wherever a LoRA adapter loads (issue 12).

* `peft_type` reads like a `peft.PeftType` member (`.value`), which transformers' native adapter
  loading and PEFT's mixed-model error read;
* every loading path gives the logits of `PeftModel.from_pretrained`, for all six methods:
  transformers' `from_pretrained(adapter_dir)`, `model.load_adapter(adapter_dir)`,
  `pipeline("text-generation", model=adapter_dir)`, `AutoPeftModelForCausalLM`, `flylora.load_adapter`;
* `adapter_names=` while an adapter is merged raises, as PEFT's LoRA does;
* adapters of `flylora train` / `flylora merge` record a base model transformers can load, and
  still reload when that path was written on another machine.
"""
from __future__ import annotations

import copy
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

import flylora.tuners  # noqa: F401  (registers the methods)
from cases import CASES
from conftest import MLP, make_inputs
from helpers import perturb

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "tasks"))
from tiny_lm import save_tiny_llama  # noqa: E402

# one llama case per method (FlyLoRA with a saved projection: the file's A must win over the seed)
METHOD_CASES = {c.name: c for c in CASES if c.name in (
    "flylora-llama-saveA", "toplora-llama-eps", "moelora-llama-none-aux", "splitlora-llama-k2",
    "hydralora-llama", "lorafa-llama-saveA")}
ATOL = 1e-5  # fp32; the measured differences are 0


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama + its tokenizer in a local folder (what base_model_name_or_path points at)."""
    return save_tiny_llama(tmp_path_factory.mktemp("interop-base"))


def _base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _save_adapter(case, base_dir, out: Path) -> Path:
    from peft import get_peft_model

    model = get_peft_model(_base(base_dir), case.config_cls(**case.kwargs))
    perturb(model, std=0.3)
    for name, buf in model.named_buffers():  # a non-zero FlyLoRA routing bias must load too
        if "flylora_bias" in name:
            buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------------------ peft_type as an enum
@pytest.mark.parametrize("case", [c for c in CASES if c.model == "mlp"][:1] + list(METHOD_CASES.values()),
                         ids=lambda c: c.config_cls.__name__)
def test_peft_type_reads_like_peft_enum(case, tmp_path):
    """config.peft_type.value / .name is the registered name (what transformers and PEFT read);
    it still equals, hashes and serialises as the plain string, through save/load, copy and pickle."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cfg = case.config_cls(**case.kwargs)
    name = cfg.method_name
    assert cfg.peft_type == name and cfg.peft_type.value == name and cfg.peft_type.name == name
    assert PEFT_TYPE_TO_CONFIG_MAPPING[cfg.peft_type] is case.config_cls
    assert json.dumps({"t": cfg.peft_type}) == json.dumps({"t": name})
    cfg.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == name
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is case.config_cls and loaded.peft_type.value == name
    for other in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert other.peft_type.value == name
    cfg.peft_type = name  # a plain string assigned later keeps the enum-like form
    assert cfg.peft_type.value == name


def test_mixed_model_gives_peft_own_error():
    """get_peft_model(..., mixed=True): PEFT's 'not compatible with the PeftMixedModel' ValueError
    (it formats peft_type.value), not an AttributeError."""
    from peft import get_peft_model

    with pytest.raises(ValueError, match="'FLYLORA' is not compatible with the `PeftMixedModel`"):
        get_peft_model(MLP(), flylora.tuners.FlyLoraConfig(r=4, k=2, target_modules=["lin0"]), mixed=True)


def test_model_card_tags_name_the_base(base_dir, tmp_path):
    """save_pretrained's model card (README.md) is written; its tags read peft_type."""
    _save_adapter(METHOD_CASES["toplora-llama-eps"], base_dir, tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "base_model:adapter:" in card


# ------------------------------------------------------------------------------ every loading path
@pytest.mark.parametrize("case", list(METHOD_CASES.values()), ids=lambda c: c.name)
def test_every_loading_path_gives_peft_from_pretrained_logits(case, base_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, pipeline

    import flylora

    adapter = _save_adapter(case, base_dir, tmp_path / "adapter")
    x = _inputs()
    with torch.no_grad():
        ref = PeftModel.from_pretrained(_base(base_dir), str(adapter)).eval()(**x).logits
        base = _base(base_dir)(**x).logits
        assert (ref - base).abs().max() > 1e-3  # the adapter changes the output

        native = AutoModelForCausalLM.from_pretrained(str(adapter)).eval()
        m = _base(base_dir)
        m.load_adapter(str(adapter))
        pipe = pipeline("text-generation", model=str(adapter), device="cpu")
        paths = {
            "transformers from_pretrained(adapter_dir)": native,
            "model.load_adapter(adapter_dir)": m.eval(),
            "pipeline(text-generation, model=adapter_dir)": pipe.model.eval(),
            "AutoPeftModelForCausalLM": AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval(),
            "flylora.load_adapter": flylora.load_adapter(_base(base_dir), str(adapter)).eval(),
        }
        for path, model in paths.items():
            diff = (model(**x).logits - ref).abs().max().item()
            assert diff <= ATOL, f"{case.name} via {path}: max logit difference {diff}"
    assert pipe(" hello", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith(" hello")


# ------------------------------------------------------------------------------ merged + adapter_names
def _mergeable():
    from peft import LoraConfig

    t = {"target_modules": ["lin0", "lin1"]}
    return {
        "lora (PEFT)": LoraConfig(r=4, init_lora_weights=False, **t),
        "flylora k=r": flylora.tuners.FlyLoraConfig(r=4, k=4, projection_seed=1, **t),
        "lora_fa": flylora.tuners.LoraFaConfig(r=4, projection_seed=2, **t),
        "moelora E=1": flylora.tuners.MoeLoraConfig(num_experts=1, expert_r=4, top_k=1, **t),
        "hydralora N=1": flylora.tuners.HydraLoraConfig(r=4, num_heads=1, **t),
    }


@pytest.mark.parametrize("name", list(_mergeable()))
def test_adapter_names_while_merged_raises_like_peft_lora(name):
    """A merged adapter is inside W0 for every row, so per-row adapters are undefined: PEFT's LoRA
    raises 'Cannot pass `adapter_names` when there are merged adapters'; so do ours (they used to
    return the merged output for every row, '__base__' rows included)."""
    from peft import get_peft_model

    model = get_peft_model(MLP(), _mergeable()[name]).eval()
    perturb(model, std=0.3)
    x = make_inputs("mlp")
    names = ["default", "__base__"] * 3
    with torch.no_grad():
        mixed = model(**x, adapter_names=names)
        model.merge_adapter()
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
            model(**x, adapter_names=names)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**x, adapter_names=names), mixed, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ base_model_name_or_path
@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """$FLYLORA_CACHE with a complete cached `embedded:smollm2-135m-instruct` (a tiny model: the
    cache layout is what matters, not the weights)."""
    from pipeline_child import tiny_model_dir

    src = tiny_model_dir(tmp_path / "tiny")  # needs the real tokenizer: before moving the cache
    monkeypatch.setenv("FLYLORA_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    shutil.copytree(src, target)
    return target


def _move_base(adapter: Path, foreign: str) -> None:
    """Pretend the adapter was written on another machine: its recorded cache path is not here."""
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = foreign
    cfg_path.write_text(json.dumps(cfg))


FOREIGN = "/home/someone-else/.cache/flylora/models/smollm2-135m-instruct"


@pytest.mark.parametrize("method", ["flylora", "lora"])
def test_train_and_merge_outputs_load_with_autopeft(method, fake_embedded, tmp_path):
    """`flylora train` on `embedded:…` records the local cache folder (transformers can load it) and
    keeps the embedded name (flylora configs: `flylora_base_model`); AutoPeftModelForCausalLM loads
    the adapter, and so does `flylora merge`'s LoRA output. With the path written on another
    machine, flylora configs relocate to this machine's cache and flylora's loaders map the path."""
    from peft import AutoPeftModelForCausalLM

    import flylora
    from flylora.cli import main as cli_main
    from flylora.models import load_model
    from flylora.pipeline.train import train
    from pipeline_child import tiny_recipe

    recipe = tiny_recipe("embedded:smollm2-135m-instruct", str(tmp_path / "run"), method, train={"max_steps": 2})
    runs = [Path(train(recipe)) / "adapter"] * 2  # merged with itself: the output format is what matters
    cfg = json.loads((runs[0] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(fake_embedded)
    if method == "flylora":
        assert cfg["flylora_base_model"] == "embedded:smollm2-135m-instruct"
    x = {"input_ids": torch.tensor([[1, 5, 9, 3]])}
    with torch.no_grad():
        want = flylora.load_adapter(load_model("embedded:smollm2-135m-instruct"), str(runs[0]))(**x).logits
        got = AutoPeftModelForCausalLM.from_pretrained(str(runs[0])).eval()(**x).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)

        moved = tmp_path / "moved"
        shutil.copytree(runs[0], moved)
        _move_base(moved, FOREIGN)
        again = flylora.load_adapter(load_model(FOREIGN), str(moved))(**x).logits  # flylora's loaders
        torch.testing.assert_close(again, want, atol=0, rtol=0)
        if method == "flylora":  # our config relocates the base: AutoPeft works on "another machine"
            auto = AutoPeftModelForCausalLM.from_pretrained(str(moved)).eval()(**x).logits
            torch.testing.assert_close(auto, want, atol=0, rtol=0)

    out = tmp_path / "merged"
    assert cli_main(["merge", f"a={runs[0]}", f"b={runs[1]}", "-m", "weight_average", "-o", str(out)]) == 0
    merged_cfg = json.loads((out / "adapter_config.json").read_text())
    assert merged_cfg["base_model_name_or_path"] == str(fake_embedded)
    with torch.no_grad():
        AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()(**x)


def test_embedded_names_and_paths(fake_embedded):
    from flylora import models

    name = "embedded:smollm2-135m-instruct"
    assert models.loadable_base_name(name) == str(fake_embedded)
    assert models.loadable_base_name("org/model") == "org/model"
    assert models.embedded_name_of(FOREIGN) == name and models.embedded_name_of(str(fake_embedded)) == name
    assert models.embedded_name_of("/some/models/other-model") is None
    assert models.resolve_model_path(FOREIGN) == str(fake_embedded)  # recorded elsewhere -> ours
    cfg = flylora.tuners.FlyLoraConfig(r=4, k=2)
    models.record_base_model(cfg, name)
    assert (cfg.base_model_name_or_path, cfg.flylora_base_model) == (str(fake_embedded), name)
    moved = flylora.tuners.FlyLoraConfig(r=4, k=2, base_model_name_or_path=FOREIGN, flylora_base_model=name)
    assert moved.base_model_name_or_path == str(fake_embedded)
