"""Recognising official FlyLoRA checkpoints (gfyddha/FlyLoRA, saved by the authors' fork of PEFT
0.15) wherever something tries to load one directly.

Their `adapter_config.json` is the fork's LoraConfig: `"peft_type": "LORA"`, `"init_lora_weights":
"sparse"`, plus two fields stock PEFT does not have, `"top_k"` and `"bias_u"`; the weights hold
`….lora_topk_bias` next to `lora_A` / `lora_B`. Stock PEFT fails on it with `Unknown initialization
init_lora_weights='sparse'`, and with that field edited it loads silently as dense LoRA (top-k and
routing bias dropped, a different function). We turn every direct load into one line naming the
converter instead.
"""
from __future__ import annotations

import os

OFFICIAL_KEYS = ("top_k", "bias_u")  # the fork's LoraConfig additions
TOPK_BIAS_KEY = "lora_topk_bias"


def convert_command(src: str = "SRC") -> str:
    return f"flylora convert --from official {src} --out DST"


def is_official_config(cfg: dict) -> bool:
    """Whether a parsed adapter_config.json is the official fork's FlyLoRA LoraConfig."""
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        return False
    return cfg.get("init_lora_weights") == "sparse" or all(k in cfg for k in OFFICIAL_KEYS)


def official_message(src: str | None = None) -> str:
    where = f"{src!r} is" if src else "this adapter is"
    return (
        f"{where} an official FlyLoRA checkpoint (gfyddha/FlyLoRA's PEFT fork: init_lora_weights='sparse', "
        f"top_k, bias_u, lora_topk_bias); PEFT's LoRA cannot run it (loaded as dense LoRA it would drop the "
        f"top-k routing and its bias), so convert it first: {convert_command(src or 'SRC')}"
    )


def _weight_keys(path: str) -> list[str]:
    """Tensor names of an adapter folder's weights (safetensors header only; nothing for .bin)."""
    f = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(f):
        return []
    try:
        from safetensors import safe_open

        with safe_open(f, framework="pt") as h:
            return list(h.keys())
    except Exception:  # noqa: BLE001  (a corrupt file is reported by the weights check)
        return []


def check_not_official(path: str, cfg: dict) -> None:
    """Raise OfficialCheckpointError for an official checkpoint, also one whose config was edited
    to load as plain LoRA (its weights still hold lora_topk_bias)."""
    from ..loading import OfficialCheckpointError

    if is_official_config(cfg):
        raise OfficialCheckpointError(official_message(path))
    if str(cfg.get("peft_type", "")).upper() == "LORA" and any(k.endswith(TOPK_BIAS_KEY) for k in _weight_keys(path)):
        raise OfficialCheckpointError(official_message(path))


def install_peft_check() -> None:
    """Make PEFT's own config loading (PeftModel.from_pretrained, AutoPeftModel*, transformers'
    `from_pretrained(adapter_dir)` / `load_adapter`) refuse an official checkpoint with our one
    line instead of `Unknown initialization init_lora_weights='sparse'` from deep inside layer
    creation. It wraps `PeftConfigMixin.check_kwargs`, which every `*Config.from_pretrained` calls
    with the whole adapter_config.json before building the config; other configs pass unchanged."""
    from peft.config import PeftConfigMixin

    current = PeftConfigMixin.__dict__["check_kwargs"]
    if getattr(current.__func__, "_flylora_official_check", False):
        return  # already installed

    def check_kwargs(cls, **kwargs):
        if is_official_config(kwargs):
            from ..loading import OfficialCheckpointError

            raise OfficialCheckpointError(official_message())
        return current.__func__(cls, **kwargs)

    check_kwargs._flylora_official_check = True
    check_kwargs.__doc__ = current.__func__.__doc__
    PeftConfigMixin.check_kwargs = classmethod(check_kwargs)
