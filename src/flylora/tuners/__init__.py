"""PEFT glue: importing this package registers every flylora method with PEFT."""
from .base import AdapterConfig, AdapterLinear, AdapterTuner, register_method
from .flylora import FlyLoraConfig, FlyLoraLayer, FlyLoraModel

__all__ = [
    "AdapterConfig", "AdapterLinear", "AdapterTuner", "register_method",
    "FlyLoraConfig", "FlyLoraLayer", "FlyLoraModel",
]  # fmt: skip

# sibling methods and the FlyLoRA paper's baselines (importing registers them with PEFT)
from .hydralora import HydraLoraConfig, HydraLoraLayer, HydraLoraModel
from .lora_fa import LoraFaConfig, LoraFaLayer, LoraFaModel
from .moelora import MoeLoraConfig, MoeLoraLayer, MoeLoraModel, moe_aux_loss
from .split_lora import SplitLoraConfig, SplitLoraLayer, SplitLoraModel
from .toplora import TopLoraConfig, TopLoraLayer, TopLoraModel

__all__ += [
    "HydraLoraConfig", "HydraLoraLayer", "HydraLoraModel",
    "LoraFaConfig", "LoraFaLayer", "LoraFaModel",
    "MoeLoraConfig", "MoeLoraLayer", "MoeLoraModel", "moe_aux_loss",
    "SplitLoraConfig", "SplitLoraLayer", "SplitLoraModel",
    "TopLoraConfig", "TopLoraLayer", "TopLoraModel",
]  # fmt: skip

# PEFT's own loaders refuse official FlyLoRA checkpoints with one line naming `flylora convert`
from ..interop.detect import install_peft_check  # noqa: E402

install_peft_check()
