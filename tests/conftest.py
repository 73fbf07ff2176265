"""Shared fixtures: tiny randomly initialised models and one torch thread per worker."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import cases`, `import helpers`


class MLP(nn.Module):
    """PEFT's test MLP: lin0 10->20, relu, lin1 20->2 (plus a norm so modules_to_save has a target)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)
        self.norm = nn.LayerNorm(2)

    def forward(self, X):
        return self.norm(self.lin1(self.relu(self.lin0(X.to(self.lin0.weight.dtype)))))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )  # fmt: skip
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP().eval()
    if kind == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(tiny_llama_config()).eval()
    raise ValueError(kind)


def make_inputs(kind: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"X": torch.randn(6, 10, generator=g)}
    ids = torch.randint(0, 64, (3, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output_of(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def tiny_llama():
    return make_model("llama")
