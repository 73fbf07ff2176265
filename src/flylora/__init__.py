"""flylora: FlyLoRA, TopLoRA and MoE-LoRA as first-class PEFT methods.

`import flylora` registers the methods with PEFT, so `peft.get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` accept them.
"""
from .balance import RoutingBiasCallback, record_routing, routing_stats, update_routing_bias
from .layers.flylora import FlyLoraLinear
from .tuners import FlyLoraConfig, FlyLoraModel
from .loading import AdapterLoadError, load_adapter

__version__ = "0.1.0"

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

# sibling methods, the FlyLoRA paper's baselines, Riemannian optimizers and parameter accounting
from . import optim  # noqa: E402
from .accounting import count_parameters  # noqa: E402
from .tuners import (  # noqa: E402
    HydraLoraConfig,
    LoraFaConfig,
    MoeLoraConfig,
    SplitLoraConfig,
    TopLoraConfig,
    moe_aux_loss,
)

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
