"""The method table run through the shared battery (tests/test_battery.py).

One row per case: which tiny model, which config, and what the method promises. Tolerances and
promises are declared here, per case, instead of `issubclass` branches inside the tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import flylora


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "mlp" or "llama"
    config_cls: type
    kwargs: dict
    trainable: tuple[str, ...]  # attribute names whose per-adapter tensors must train
    init_equals_base: bool = True  # output equals the base model right after init
    mergeable: bool = False  # merge_and_unload is exact (else it must raise)
    atol: float = 1e-5
    extra: dict = field(default_factory=dict)


MLP_TARGETS = {"target_modules": ["lin0", "lin1"]}

CASES = [
    Case("flylora-mlp-r8k2", "mlp", flylora.FlyLoraConfig, {"r": 8, "k": 2, "lora_alpha": 16, **MLP_TARGETS}, ("flylora_B",)),
    Case("flylora-mlp-abs", "mlp", flylora.FlyLoraConfig, {"r": 8, "k": 3, "topk_on": "abs", **MLP_TARGETS}, ("flylora_B",)),
    Case("flylora-mlp-sparsity", "mlp", flylora.FlyLoraConfig, {"r": 4, "k": 1, "sparsity": 0.5, **MLP_TARGETS}, ("flylora_B",)),
    Case("flylora-mlp-k=r", "mlp", flylora.FlyLoraConfig, {"r": 4, "k": 4, **MLP_TARGETS}, ("flylora_B",), mergeable=True),
    Case("flylora-llama-r8k2", "llama", flylora.FlyLoraConfig, {"r": 8, "k": 2}, ("flylora_B",)),
    Case("flylora-llama-saveA", "llama", flylora.FlyLoraConfig, {"r": 16, "k": 4, "save_projection": True}, ("flylora_B",)),
    Case("flylora-llama-k=r", "llama", flylora.FlyLoraConfig, {"r": 4, "k": 4, "sparsity": 1.0}, ("flylora_B",), mergeable=True),
]
