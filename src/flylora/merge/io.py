"""Writing merge results: merged full weights (W0 + ΔW) and PEFT LoRA adapter folders."""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

from flylora.merge.deltas import LowRankDelta

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def merged_full_weights(base_weights: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """W' = W0 + ΔW per merged module, added in fp32 (or wider) and cast back to W0's dtype.

    `base_weights` may be keyed by module name (`…q_proj`) or be a state dict (`…q_proj.weight`);
    the result has the same keys as `base_weights`, with untouched entries passed through as-is.
    """
    out = dict(base_weights)
    for name, dw in deltas.items():
        key = name if name in base_weights else f"{name}.weight"
        if key not in base_weights:
            raise ValueError(f"no base weight for merged module {name!r} (looked for {name!r} and {key!r})")
        w0 = base_weights[key]
        if tuple(w0.shape) != tuple(dw.shape):
            raise ValueError(
                f"module {name!r}: ΔW shape {tuple(dw.shape)} does not match base weight {tuple(w0.shape)}"
            )
        dt = torch.promote_types(torch.promote_types(w0.dtype, dw.dtype), torch.float32)
        out[key] = (w0.to(dt) + dw.to(device=w0.device, dtype=dt)).to(w0.dtype)
    return out


def lora_state_dict(adapter: Mapping[str, LowRankDelta], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """PEFT LoRA tensors for scaling 1: `base_model.model.<module>.lora_A.weight` = A (r, n) and
    `….lora_B.weight` = scale · B (m, r), so lora_B · lora_A = scale · B · A = ΔW."""
    tensors = {}
    for name, f in adapter.items():
        prefix = f"base_model.model.{name}"
        B = f.scale * f.B.detach()  # fold the scale in: the written adapter has scaling 1
        A = f.A.detach()
        tensors[f"{prefix}.lora_A.weight"] = A.to(dtype or A.dtype).contiguous().clone()
        tensors[f"{prefix}.lora_B.weight"] = B.to(dtype or B.dtype).contiguous().clone()
    return tensors


def lora_config_for(adapter: Mapping[str, LowRankDelta], **config_kwargs):
    """`peft.LoraConfig` for these factors with scaling 1 everywhere (lora_alpha = r).

    The most common rank is `r`; modules of other ranks go to `rank_pattern`/`alpha_pattern`
    under their escaped full name (PEFT matches those keys as `(.*\\.)?(key)$`).
    """
    from peft import LoraConfig

    from flylora.models import loadable_base_name

    if not adapter:
        raise ValueError("adapter is empty: nothing to write")
    if config_kwargs.get("base_model_name_or_path") is not None:
        # an `embedded:` name is not something transformers loads (AutoPeftModel*): record its local
        # folder; resolve_model_path maps that folder back to the embedded model on another machine
        config_kwargs["base_model_name_or_path"] = loadable_base_name(config_kwargs["base_model_name_or_path"])
    ranks = {name: f.rank for name, f in adapter.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda x: (counts[x], -x))  # most common, smallest on ties
    pattern = {re.escape(name): ri for name, ri in ranks.items() if ri != r}
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=list(adapter.keys()),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        **config_kwargs,
    )


def write_dir_atomically(
    out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False, kind: str = "merge"
) -> Path:
    """Run `write(tmp_dir)` in a temp dir next to `out_dir`, fsync it, then os.replace it into place,
    so a reader never sees a half-written folder (flylora.fsutil.atomic_dir). An existing `out_dir`
    is replaced only if `overwrite`, and only when flylora wrote it; the new one gets our marker."""
    from flylora.fsutil import atomic_dir

    return atomic_dir(out_dir, write, overwrite=overwrite, kind=kind)


def save_peft_lora_adapter(
    adapter: Mapping[str, LowRankDelta],
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write {module: LowRankDelta} as a PEFT LoRA folder loadable by `PeftModel.from_pretrained`.

    The loaded adapter computes lora_B · lora_A · 1 = scale · B · A per module (scale folded into B,
    lora_alpha = r so PEFT's scaling is 1; per-module ranks via rank_pattern/alpha_pattern).
    Files: adapter_config.json and adapter_model.safetensors, written atomically.
    """
    from safetensors.torch import save_file

    config = lora_config_for(adapter, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    tensors = lora_state_dict(adapter, dtype)

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return write_dir_atomically(out_dir, write, overwrite=overwrite)
