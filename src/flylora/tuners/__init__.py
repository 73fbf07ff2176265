"""PEFT glue: importing this package registers every flylora method with PEFT."""
from .base import AdapterConfig, AdapterLinear, AdapterTuner, register_method
from .flylora import FlyLoraConfig, FlyLoraLayer, FlyLoraModel

__all__ = [
    "AdapterConfig", "AdapterLinear", "AdapterTuner", "register_method",
    "FlyLoraConfig", "FlyLoraLayer", "FlyLoraModel",
]  # fmt: skip
