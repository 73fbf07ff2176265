"""Small helpers shared by the battery and the method-specific tests."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from conftest import make_inputs, make_model, output_of

HERE = os.path.dirname(os.path.abspath(__file__))


def build(case, adapter_name: str = "default", seed: int = 0, **overrides):
    base = make_model(case.model, seed=seed)
    return get_peft_model(base, case.config_cls(**{**case.kwargs, **overrides}), adapter_name=adapter_name)


@torch.no_grad()
def perturb(model, adapter_name: str = "default", seed: int = 0, std: float = 0.5) -> None:
    """Give an adapter's trainable tensors random values, so its output differs from the base."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if f".{adapter_name}" in name and any(f".{t}." in name or name.endswith(f".{t}.{adapter_name}") for t in _trainable_attrs(model)):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _trainable_attrs(model) -> set[str]:
    return {a for m in model.modules() if isinstance(m, BaseTunerLayer) for a in m.adapter_layer_names}


def tuner_layers(model):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def run_child(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run a python script from tests/ in a fresh process with one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    if proc.returncode != 0:
        raise AssertionError(f"child {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


__all__ = ["build", "perturb", "tuner_layers", "run_child", "make_inputs", "make_model", "output_of"]
