"""Helpers for the pipeline tests (train / merge / report), and a child script.

As a module: `tiny_model_dir(path)` writes a tiny random Llama (2 layers, hidden 32) with the
SmolLM2 tokenizer, so recipes can point `model.name_or_path` at a real folder and the real data
path (task -> tokenize) runs in seconds; `tiny_recipe(...)` is a recipe dict for it.

As a script:
  python pipeline_child.py train-and-die RECIPE_JSON STEP
      train the recipe and kill the process (os._exit) right after checkpoint STEP is saved:
      an interruption with no final adapter, as a crash would leave it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model_dir(path: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random LlamaForCausalLM + the SmolLM2 tokenizer saved under `path` (once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flylora.models import load_tokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    tok = load_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def tiny_recipe(model_dir: str, out_dir: str, method: str = "flylora", **sections) -> dict:
    """A recipe dict that trains in seconds on the tiny model (carved SST-2 rows, 48 tokens)."""
    configs = {"flylora": {"r": 8, "k": 2, "lora_alpha": 16, "bias_update_rate": 0.01},
               "lora": {"r": 4, "lora_alpha": 8}}
    recipe = {
        "name": "tiny",
        "model": {"name_or_path": model_dir},
        "method": {"name": method, "config": configs.get(method, {})},
        "data": {"task": "glue:sst2", "split": "carved-train", "limit": 24, "cutoff_len": 48},
        "train": {"lr": 1e-2, "max_steps": 4, "micro_batch_size": 4, "logging_steps": 1, "save_steps": 100,
                  "seed": 0},
        "output": {"dir": out_dir, "progress": False, "tensorboard": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def _train_and_die(recipe_json: str, step: int) -> None:
    from transformers import TrainerCallback

    from flylora.pipeline.train import train

    class Die(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                sys.stdout.flush()
                os._exit(3)  # no cleanup, no final save: like a kill

    train(json.loads(Path(recipe_json).read_text()), callbacks=[Die()])
    raise SystemExit("training finished without reaching the kill step")


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    if sys.argv[1] == "train-and-die":
        _train_and_die(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
