"""Loading adapters with one clear line per failure (missing folder or file, corrupt weights,
wrong base model) instead of a deep traceback from safetensors or torch."""
from __future__ import annotations

import json
import os

from torch import nn

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded onto the given model."""


def check_adapter_dir(path: str) -> dict:
    """Validate an adapter folder and return its parsed adapter_config.json."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter folder {path!r} does not exist")
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path!r} is missing: not an adapter folder written by save_pretrained")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{cfg_path!r} is corrupt ({e})") from None
    if not any(os.path.isfile(os.path.join(path, f)) for f in ADAPTER_FILES):
        raise FileNotFoundError(f"{path!r} holds no adapter weights (expected one of {list(ADAPTER_FILES)})")
    weights = next(os.path.join(path, f) for f in ADAPTER_FILES if os.path.isfile(os.path.join(path, f)))
    if weights.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(weights, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise AdapterLoadError(f"adapter weights {weights!r} are corrupt ({e})") from None
    return cfg


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False):
    """Load an adapter folder onto `model` (a base model or a PeftModel that gets another adapter)."""
    import flylora  # noqa: F401  (registers the methods)
    from peft import PeftModel

    check_adapter_dir(path)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise AdapterLoadError(f"adapter {path!r} does not fit this base model: {first[0] if first else e}") from None
