"""Loading adapters with one clear line per failure (missing folder or file, corrupt weights,
wrong base model) instead of a deep traceback from safetensors or torch."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI imports this module early
    from torch import nn

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded onto the given model."""


class OfficialCheckpointError(AdapterLoadError):
    """An official FlyLoRA checkpoint (authors' PEFT fork) given where a PEFT adapter is expected."""


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
    from .interop.detect import check_not_official

    check_not_official(path, cfg)  # one line naming `flylora convert`, not PEFT's init error
    weights = next(os.path.join(path, f) for f in ADAPTER_FILES if os.path.isfile(os.path.join(path, f)))
    check_weights_file(weights)
    return cfg


def check_weights_file(weights: str) -> None:
    """Every tensor of an adapter weights file readable (not truncated) and finite: a NaN/inf
    adapter would load silently, then merge to NaN or score 0, so it is refused here, naming the
    file and the first bad tensor."""
    import torch

    try:
        if weights.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(weights, framework="pt") as f:
                tensors = ((key, f.get_tensor(key)) for key in f.keys())
                _check_finite(weights, tensors)
            return
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except AdapterLoadError:
        raise
    except Exception as e:  # safetensors/torch raise their own error types for bad headers/truncation
        first = str(e).strip().splitlines()
        raise AdapterLoadError(f"adapter weights {weights!r} are corrupt or truncated "
                               f"({first[0] if first else type(e).__name__})") from None
    if not isinstance(state, dict):
        raise AdapterLoadError(f"adapter weights {weights!r} are not a state dict")
    _check_finite(weights, state.items())


def _check_finite(weights: str, tensors) -> None:
    import torch

    for key, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterLoadError(f"adapter weights {weights!r}: tensor {key!r} has {bad} non-finite "
                                   f"value(s) (NaN/inf) of {t.numel()}; refusing to load it")


def check_model_path(name_or_path: str | os.PathLike | None) -> None:
    """One line for a model given as a local path that does not exist (otherwise transformers
    reports it as an invalid hub repo id, with a long traceback). Hub ids (`org/name`) and
    `embedded:` names pass through."""
    if name_or_path is None:
        return
    name = str(name_or_path)
    if name.startswith("embedded:") or os.path.exists(name):
        return
    looks_local = (os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\")) or name in (".", "..")
                   or name.count("/") > 1 or "\\" in name)
    if looks_local:
        from .models import embedded_name_of

        if embedded_name_of(name):  # an embedded model's cache path recorded on another machine
            return
        raise FileNotFoundError(f"model path {name!r} does not exist (give an existing local folder, "
                                "a Hugging Face hub id like org/name, or embedded:smollm2-135m-instruct)")


def load_adapter(model: "nn.Module", path: str, adapter_name: str = "default", is_trainable: bool = False):
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
