"""flylora: FlyLoRA, TopLoRA and MoE-LoRA as first-class PEFT methods.

`import flylora` registers the methods with PEFT, so `peft.get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` accept them.

The package is lazy, so that `flylora --help` does not pay for torch and PEFT (6-8 s on a small
machine): the names below are imported on first use, and the registration happens at once if
PEFT is already imported, else the moment PEFT is (an import hook, `_lazy.register_with_peft`).
"""
from ._lazy import lazy_attributes as _lazy_attributes
from ._lazy import register_with_peft as _register_with_peft
from .quantization import quiet_bitsandbytes as _quiet_bitsandbytes

_quiet_bitsandbytes()  # logging filters only (no import): PEFT imports bitsandbytes, which logs a CPU-kernel notice

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first attribute access)
_EXPORTS = {
    "RoutingBiasCallback": "balance", "record_routing": "balance", "routing_stats": "balance",
    "update_routing_bias": "balance",
    "FlyLoraLinear": "layers.flylora",
    "FlyLoraConfig": "tuners", "FlyLoraModel": "tuners",
    "AdapterLoadError": "loading", "load_adapter": "loading",
    # sibling methods, the FlyLoRA paper's baselines, Riemannian optimizers and parameter accounting
    "count_parameters": "accounting",
    "HydraLoraConfig": "tuners", "LoraFaConfig": "tuners", "MoeLoraConfig": "tuners",
    "SplitLoraConfig": "tuners", "TopLoraConfig": "tuners", "moe_aux_loss": "tuners",
}
_SUBMODULES = ("optim",)

__all__ = [
    "AdapterLoadError",
    "FlyLoraConfig",
    "FlyLoraLinear",
    "FlyLoraModel",
    "RoutingBiasCallback",
    "load_adapter",
    "record_routing",
    "routing_stats",
    "update_routing_bias",
]
__all__ += [
    "HydraLoraConfig",
    "LoraFaConfig",
    "MoeLoraConfig",
    "SplitLoraConfig",
    "TopLoraConfig",
    "count_parameters",
    "moe_aux_loss",
    "optim",
]


__getattr__, __dir__ = _lazy_attributes(__name__, _EXPORTS, _SUBMODULES, globals())

_register_with_peft()
