"""Generic PEFT glue: the one place that knows PEFT's tuner contract.

A method = a config dataclass + an `AdapterLinear` subclass (per-adapter tensors in PEFT-style
containers, and `adapter_delta(x, name)`) + an `AdapterTuner` subclass, registered with
`register_method`. Forward over several active adapters, disabling, mixed-batch inference
(`adapter_names=`), merging/unmerging and device placement are written once, here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..quantization import merge_refusal, quantized_kind

# paper Table 18: every attention and MLP projection
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in mixed-batch inference


class MethodType(str):
    """A registered method's name that reads like a member of `peft.PeftType`.

    PeftType is a `str` Enum that a third-party package cannot extend, so our configs hold a plain
    string; but PEFT and transformers read `config.peft_type.value` (transformers' native adapter
    loading, `get_peft_model(..., mixed=True)`'s error, the Trainer's log line). A `str` subclass
    with `.value` / `.name` satisfies both: it hashes and compares as the string (so the mapping
    dicts and `== "FLYLORA"` work) and serialises to JSON as the string.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)


@dataclass
class AdapterConfig(PeftConfig):
    """Fields shared by every flylora method; names follow LoraConfig where the meaning is the same."""

    r: int = field(default=8, metadata={"help": "adapter rank"})
    lora_alpha: float = field(default=16, metadata={"help": "scale numerator: the update is scaled by lora_alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "module names (suffix match) or a regex (full match); default: q,k,v,o,gate,up,down proj"},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "layer list name"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "extra modules trained in full and saved (e.g. a classifier head)"}
    )
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "unused; PEFT reads it"})
    flylora_base_model: Optional[str] = field(
        default=None,
        metadata={
            "help": "flylora's own name of the base model (e.g. embedded:smollm2-135m-instruct) when "
            "base_model_name_or_path holds the local folder it resolves to (what transformers loads)"
        },
    )

    #: subclasses set the registered method name, e.g. "FLYLORA"
    method_name = ""

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MethodType(self.method_name)
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r={self.r!r} is not allowed: r must be a positive integer")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is not allowed: it must lie in [0, 1)")
        self._relocate_base_model()

    def _relocate_base_model(self) -> None:
        """An adapter saved on another machine records that machine's cache folder of an embedded
        base model; point it at this machine's (converted on first use), so AutoPeftModel* and
        transformers' native loading find the base. Left as is when that cannot be done here."""
        path = self.base_model_name_or_path
        if self.flylora_base_model is None or path is None or os.path.exists(str(path)):
            return
        from ..models import embedded_name_of, resolve_model_path

        if embedded_name_of(self.flylora_base_model) is None:
            return
        try:
            self.base_model_name_or_path = resolve_model_path(self.flylora_base_model)
        except (FileNotFoundError, ValueError, OSError):  # embedded package missing here: keep the record
            pass

    def __setattr__(self, name, value):
        # whoever assigns a plain string (PEFT's from_peft_type, user code) still gets the enum-like form
        if name == "peft_type" and type(value) is str:
            value = MethodType(value)
        super().__setattr__(name, value)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Reject unknown keys with one line naming them (PeftConfig.from_pretrained would just drop them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(known)}")
        return kwargs


class AdapterLinear(nn.Module, BaseTunerLayer):
    """y = W0 x + Σ_{a active} delta_a(x), around a frozen nn.Linear.

    Subclasses declare `adapter_layer_names` (trainable per-adapter containers),
    `other_param_names` (buffers/settings per adapter) and implement `update_layer`,
    `adapter_delta` and, if the method can be folded into W0, `get_delta_weight`.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterConfig, layer_key: str):
        nn.Module.__init__(self)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"module {layer_key!r} is a {type(base_layer).__name__}; {config.method_name.lower()} adapts "
                f"torch.nn.Linear layers only"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.layer_key = layer_key
        self._disable_adapters = False
        self.merged_adapters = []
        self._batch_adapter_names: list[str] | None = None  # set during mixed-batch inference
        self._create_containers()
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name

    # ---- what a method provides -------------------------------------------------------------
    def _create_containers(self) -> None:
        """Create the empty per-adapter containers named in adapter_layer_names/other_param_names."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config: AdapterConfig) -> None:
        raise NotImplementedError

    def adapter_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weight")

    # ---- shared machinery -------------------------------------------------------------------
    def _finish_update(self, adapter_name: str) -> None:
        # New per-adapter modules (dropout) start in training mode; match the model they join, so
        # add_adapter on an eval-mode model does not switch on the new adapter's dropout.
        training = self.get_base_layer().training
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if isinstance(container, nn.ModuleDict) and adapter_name in container:
                container[adapter_name].train(training)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, self.adapter_layer_names[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self._batch_adapter_names is not None:
            return self._mixed_batch_forward(x, result)
        for name in self.active_adapters:
            if self.has_adapter(name):
                result = result + self.adapter_delta(x, name).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Row b of the batch gets adapter names[b] (or none for "__base__"), the full method each."""
        names = self._batch_adapter_names
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} rows")
        result = result.clone()
        for name in sorted(set(names)):
            if name == BASE_ADAPTER or not self.has_adapter(name):
                continue
            rows = [i for i, n in enumerate(names) if n == name]
            sub = self.adapter_delta(x[rows], name)
            result[rows] = result[rows] + sub.to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = check_adapters_to_merge(self, adapter_names)
        kind = quantized_kind(self.get_base_layer())
        if kind and names:  # a 4-bit / int8 W0: refused, see flylora.quantization
            raise ValueError(merge_refusal(self.layer_key, kind))
        for name in names:
            if not self.has_adapter(name):
                continue
            w = self.get_base_weight()
            merged = w + self.get_delta_weight(name).to(w.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} into {self.layer_key!r} gives non-finite weights")
            self.set_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = self.get_base_weight()
            self.set_base_weight(w - self.get_delta_weight(name).to(w.dtype))

    def _check_shape(self, adapter_name: str, tensor_name: str, got: torch.Size, want: tuple) -> None:
        if tuple(got) != tuple(want):
            raise ValueError(
                f"adapter {adapter_name!r}: {tensor_name} for {self.layer_key!r} has shape {tuple(got)} but this "
                f"base layer needs {tuple(want)}; the adapter was made for a base model of different shapes"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # One clear line instead of torch's multi-line size-mismatch dump when an adapter is loaded
        # onto a base model of different shapes.
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if not isinstance(container, nn.Module):
                continue
            for name, own in list(container.named_parameters(recurse=False)) + list(container.named_buffers(recurse=False)):
                key = f"{prefix}{attr}.{name}"
                if key in state_dict and state_dict[key].shape != own.shape:
                    self._check_shape(name, attr, state_dict[key].shape, own.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layer_key}: {self.in_features}->{self.out_features}, adapters={self._all_available_adapter_names()})"


class AdapterTuner(BaseTuner):
    """BaseTuner for flylora methods: targets default to the 7 projections, layers come from `layer_cls`."""

    layer_cls: type[AdapterLinear]
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: AdapterConfig, model_config: dict) -> AdapterConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = list(DEFAULT_TARGET_MODULES)
        return peft_config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, self.layer_cls):
            target.update_layer(adapter_name, config)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"module {current_key!r} already holds a {type(target).__name__} adapter of another method")
        new = self.layer_cls(target, adapter_name, config, layer_key=current_key)
        self._attach(new)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _attach(self, layer: AdapterLinear) -> None:
        """Hook for tuners that share state with their layers."""

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """Mixed-batch inference: `model(..., adapter_names=[...])`, one name per batch row."""
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names (mixed-batch inference) is not allowed in training mode; call model.eval()")
        known = set(self.peft_config) | {BASE_ADAPTER}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; known: {sorted(known)}")
        layers = [m for m in self.model.modules() if isinstance(m, AdapterLinear)]
        if any(layer.merged for layer in layers):
            # as PEFT's LoRA: a merged adapter is inside W0 for every row, so per-row choice is undefined
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        if kwargs.get("num_beams", 1) not in (None, 1):
            raise ValueError("adapter_names with beam search is not supported; use num_beams=1")
        for layer in layers:
            layer._batch_adapter_names = list(adapter_names)
        try:
            yield
        finally:
            for layer in layers:
                layer._batch_adapter_names = None

    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        for name, config in self.peft_config.items():
            reason = self.merge_blocker(config)
            if reason and name in self.active_adapters:
                raise ValueError(f"adapter {name!r} cannot be merged into the base weights: {reason}")
        for layer in self.model.modules():  # before any layer merges: never half a merged model
            kind = quantized_kind(layer.get_base_layer()) if isinstance(layer, AdapterLinear) else None
            if kind:
                raise ValueError(merge_refusal(layer.layer_key, kind))

    def merge_blocker(self, config: AdapterConfig) -> str | None:
        """Why an adapter of this config cannot be merged exactly, or None if it can."""
        return None


def register_method(name: str, config_cls: type[AdapterConfig], tuner_cls: type[AdapterTuner]) -> None:
    """Register a method with PEFT without forking it.

    `peft.register_peft_method` needs the name in PEFT's `PeftType` enum, which a third-party
    package cannot extend; PEFT's lookups are plain-string dict lookups, so writing the three
    mapping dicts directly is enough for get_peft_model, save_pretrained and from_pretrained.
    """
    key = name.upper()
    if PEFT_TYPE_TO_PREFIX_MAPPING.get(key, tuner_cls.prefix) != tuner_cls.prefix:
        warnings.warn(f"re-registering PEFT method {key} with a different prefix")
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[key] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = tuner_cls.prefix
