"""LoRA-FA as a registered PEFT method: `get_peft_model(model, LoraFaConfig(...))`.

It is FlyLoRA with k = r and sparsity 1 (FlyLoRA paper §4.1: "FlyLoRA with k=r reduces to
LoRA-FA"), so it shares FlyLoRA's layer, state and code path: the adapter file holds `flylora_B`
(and the unused, all-zero `flylora_bias`); A is regenerated from `projection_seed` unless
`save_projection=True`. Only the config differs, and it fixes k, sparsity and routing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .base import AdapterConfig, register_method
from .flylora import FlyLoraLayer, FlyLoraModel
from .projection import resolve_projection_seed


@dataclass
class LoraFaConfig(AdapterConfig):
    """LoRA-FA hyperparameters; defaults follow the FlyLoRA paper's comparison (r=32, α=64, dropout 0,
    all 7 projections)."""

    r: int = field(default=32, metadata={"help": "rank of the frozen A and the trainable B"})
    lora_alpha: float = field(default=64, metadata={"help": "the update is scaled by lora_alpha / r"})
    projection_seed: Optional[int] = field(
        default=None, metadata={"help": "seed of the frozen A; default: drawn fresh (and saved)"}
    )
    save_projection: bool = field(default=False, metadata={"help": "also store A in the adapter file"})
    projection_fingerprint: Optional[str] = field(
        default=None, metadata={"help": "sha256 of A (written by save_pretrained); a regenerated A must match it"}
    )

    method_name = "LORA_FA"

    # What FlyLoraLayer reads besides the fields above; class attributes, so they are not saved.
    sparsity = 1.0  # dense A
    topk_on = "signed"  # unused: with k = r nothing is selected
    bias_update_rate = 0.0

    @property
    def k(self) -> int:
        return self.r  # every rank-1 expert active: the plain frozen-A LoRA

    def __post_init__(self):
        super().__post_init__()
        resolve_projection_seed(self)  # as FlyLoraConfig: a fresh, rank-agreed seed when unset


class LoraFaLayer(FlyLoraLayer):
    """FlyLoraLayer holding LoRA-FA adapters (k = r): same tensors, same forward."""


class LoraFaModel(FlyLoraModel):
    prefix = "flylora_"  # the shared layer's tensors are named flylora_*
    tuner_layer_cls = LoraFaLayer
    layer_cls = LoraFaLayer


register_method("lora_fa", LoraFaConfig, LoraFaModel)
