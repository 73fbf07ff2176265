"""FlyLoRA as a registered PEFT method: `get_peft_model(model, FlyLoraConfig(...))`.

Per adapter, each targeted nn.Linear holds
  flylora_A       dense frozen (r, n) projection, a non-persistent buffer regenerated from the seed
  flylora_A_cols  its sparse form (r, p) column indices, kept only with save_projection=True
  flylora_A_vals  (r, p) values, ditto; then saved so the adapter file is self-contained
  flylora_B       (m, r) the only trainable tensor
  flylora_bias    (r,) routing bias d, a persistent fp32 buffer (it changes inference, so it is saved)
  flylora_seed    (1,) int64 projection_seed A was built from, saved, so a state dict carries A's identity
                  (seed agreement across ranks and the A fingerprint: `flylora.tuners.projection`)
The math lives in `flylora.layers.flylora`; this file is PEFT bookkeeping.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..layers.flylora import check_hyperparameters, densify, routed_delta
from ..layers.routing import BIAS_CADENCES, TOPK_MODES, AfterBackward, count_on_backward, index_counts
from .base import AdapterConfig, AdapterLinear, AdapterTuner, register_method
from .projection import (
    Fp32BufferDict, ProjectionLayerMixin, ProjectionTunerMixin, resolve_projection_seed,
)  # fmt: skip


@dataclass
class FlyLoraConfig(AdapterConfig):
    """FlyLoRA hyperparameters; defaults are paper Table 18 (r=32, α=64, k=8, dropout 0)."""

    r: int = field(default=32, metadata={"help": "total rank: number of rank-1 experts"})
    lora_alpha: float = field(default=64, metadata={"help": "the update is scaled by lora_alpha / r (total r)"})
    k: int = field(default=8, metadata={"help": "experts activated per token (top-k)"})
    sparsity: Optional[float] = field(
        default=None, metadata={"help": "fraction of nonzeros per row of A, in (0, 1]; default k/r"}
    )
    topk_on: str = field(
        default="signed",
        metadata={"help": "'signed': top-k of (Ax+d) (paper Eq. 10, official PEFT code); 'abs': of |Ax+d| (flylora.py)"},
    )
    bias_update_rate: float = field(default=1e-3, metadata={"help": "u in d_i += u·sign(mean(c) - c_i)"})
    bias_update_every: str = field(
        default="step",
        metadata={"help": "'step': update d once per optimizer step (update_routing_bias / RoutingBiasCallback); "
                  "'micro_batch': after every training micro-batch's backward, automatically (official cadence)"},
    )
    projection_seed: Optional[int] = field(
        default=None,
        metadata={"help": "seed of A; default: drawn fresh (and saved), so two adapters get independent A"},
    )
    save_projection: bool = field(default=False, metadata={"help": "also store A (sparse) in the adapter file"})
    projection_fingerprint: Optional[str] = field(
        default=None,
        metadata={"help": "sha256 of A (written by save_pretrained); A regenerated from the seed must match it"},
    )

    method_name = "FLYLORA"

    def __post_init__(self):
        super().__post_init__()
        check_hyperparameters(self.r, self.k, self.sparsity)
        if self.topk_on not in TOPK_MODES:
            raise ValueError(f"topk_on={self.topk_on!r} is not allowed; use one of {list(TOPK_MODES)}")
        if not self.bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate={self.bias_update_rate!r} is not allowed: it must be >= 0")
        if self.bias_update_every not in BIAS_CADENCES:
            raise ValueError(
                f"bias_update_every={self.bias_update_every!r} is not allowed; use one of {list(BIAS_CADENCES)}"
            )
        resolve_projection_seed(self)  # a fresh seed when unset (agreed across ranks on injection)


def _set_persistent(buffers: BufferDict, key: str, persistent: bool) -> None:
    (buffers._non_persistent_buffers_set.discard if persistent else buffers._non_persistent_buffers_set.add)(key)


class _RoutingContext:
    """Shared by the layers of one model: the attention mask of the current forward, and the
    layers that have counted tokens since the last bias update (so `update_routing_bias` need
    not walk every module of the model once per optimizer step)."""

    def __init__(self) -> None:
        self.token_mask: Optional[torch.Tensor] = None
        self.pending_layers: dict[int, "FlyLoraLayer"] = {}
        self._weights: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def token_weights(self, device: torch.device, repeat: int) -> torch.Tensor:
        """The current token mask as flat fp32 weights, each repeated `repeat` times (once per
        chosen expert), made once per forward and device instead of once per layer. Keyed on the
        mask object and its version counter, so a mask edited in place is converted again."""
        mask, key = self.token_mask, (device, repeat)
        hit = self._weights.get(key)
        if hit is None or hit[0] is not mask or hit[1] != mask._version:
            w = mask.to(device=device, dtype=torch.float32).reshape(-1, 1).expand(-1, repeat).reshape(-1)
            hit = self._weights[key] = (mask, mask._version, w)
        return hit[2]


class FlyLoraLayer(ProjectionLayerMixin, AdapterLinear):
    adapter_layer_names = ("flylora_B",)
    other_param_names = (
        "flylora_A", "flylora_A_cols", "flylora_A_vals", "flylora_bias", "flylora_dropout",
        "r", "k", "scaling", "topk_on", "bias_update_rate", "bias_update_every",
        "flylora_seed", "a_seed", "a_nnz", "a_digest",
    )  # fmt: skip

    WARN_AFTER_FORWARDS = 1000

    def _create_containers(self) -> None:
        self.flylora_B = nn.ParameterDict()
        self.flylora_A = BufferDict(persistent=False)
        self.flylora_A_cols = _SparseFormDict(self)
        self.flylora_A_vals = _SparseFormDict(self)
        self.flylora_bias = Fp32BufferDict(persistent=True)  # fp32 through model.half() too
        self._create_projection_containers()  # flylora_seed, a_seed, a_nnz, a_digest
        self.flylora_dropout = nn.ModuleDict()
        self.r, self.k, self.scaling, self.topk_on, self.bias_update_rate = {}, {}, {}, {}, {}
        self.bias_update_every: dict[str, str] = {}
        self.routing_context: Optional[_RoutingContext] = None
        # counts are plain tensors, not buffers: DDP broadcasts buffers from rank 0 on every forward
        self.pending_counts: dict[str, torch.Tensor] = {}
        self.load_totals: dict[str, torch.Tensor] = {}
        self.recording = False
        self._forwards_since_update = 0
        self.register_load_state_dict_post_hook(_rebuild_dense_projection)

    def update_layer(self, adapter_name: str, config: FlyLoraConfig) -> None:
        r, k, n, m = config.r, config.k, self.in_features, self.out_features
        p = check_hyperparameters(r, k, config.sparsity, n)
        # A (r, n) and, with save_projection, its sparse form (r, p); flylora_seed records the seed
        self.build_projection(adapter_name, config.projection_seed, r, p, keep_sparse=config.save_projection)
        self.flylora_B[adapter_name] = nn.Parameter(torch.zeros(m, r))  # (m, r), zero: starts at W0
        self.flylora_bias[adapter_name] = torch.zeros(r)
        self.flylora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.r[adapter_name], self.k[adapter_name] = r, k
        self.scaling[adapter_name] = config.lora_alpha / r
        self.topk_on[adapter_name] = config.topk_on
        self.bias_update_rate[adapter_name] = config.bias_update_rate
        self.bias_update_every[adapter_name] = getattr(config, "bias_update_every", "step")  # LoRA-FA: none
        self._finish_update(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        # PEFT casts float buffers to the base dtype; d must stay fp32 (in fp16 a 1e-3 step is lost
        # once |d| >= 4) and the sparse values stay exact so a saved A reloads bit-identically.
        for store in (self.flylora_bias, self.flylora_A_vals):
            if adapter_name in store:
                store[adapter_name] = store[adapter_name].float()

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        k, r = self.k[name], self.r[name]
        delta, idx = routed_delta(
            x, self.flylora_A[name], self.flylora_B[name], self.flylora_bias[name],
            k, self.scaling[name], self.topk_on[name], self.flylora_dropout[name],
        )  # fmt: skip
        counting = self.training and torch.is_grad_enabled() and k < r
        if counting or self.recording:
            counts = index_counts(idx, r, self._token_weight(x, k if idx is not None else 1), x)  # (r,)
            if counting:
                delta = count_on_backward(delta, counts, self._sink(self.pending_counts, name, r, x.device))
                self._note_training_forward()
                if self.routing_context is not None:
                    self.routing_context.pending_layers[id(self)] = self
            else:
                self._sink(self.load_totals, name, r, x.device).add_(counts)
        return delta

    def _token_weight(self, x: torch.Tensor, repeat: int = 1) -> Optional[torch.Tensor]:
        """Flat fp32 token weights (1 = real token, 0 = padding) repeated `repeat` times each, when
        the model forward had an attention mask matching x's token dims; else None."""
        ctx = self.routing_context
        mask = ctx.token_mask if ctx is not None else None
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            return ctx.token_weights(x.device, repeat)
        return None

    @staticmethod
    def _sink(store: dict, name: str, r: int, device) -> torch.Tensor:
        t = store.get(name)
        if t is None or t.device != torch.device(device):
            t = store[name] = torch.zeros(r, device=device)
        return t

    def _note_training_forward(self) -> None:
        self._forwards_since_update += 1
        if self._forwards_since_update == self.WARN_AFTER_FORWARDS:
            warnings.warn(
                f"FlyLoRA routing bias of {self.layer_key!r} has not been updated in {self.WARN_AFTER_FORWARDS} "
                "training forwards: add flylora.RoutingBiasCallback() to your Trainer, or call "
                "flylora.update_routing_bias(model) after each optimizer step"
            )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = (α/r)·B·A, exact only when every expert is active (k = r)."""
        if self.k[adapter_name] < self.r[adapter_name]:
            raise ValueError(merge_blocker_text(self.k[adapter_name], self.r[adapter_name]))
        B, A = self.flylora_B[adapter_name], self.flylora_A[adapter_name]
        return (B.float() @ A.float()) * self.scaling[adapter_name]  # (m, n)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.pending_counts.pop(adapter_name, None)
        self.load_totals.pop(adapter_name, None)


def _rebuild_dense_projection(layer: FlyLoraLayer, incompatible_keys) -> None:
    """After loading a self-contained adapter, A comes from the file's sparse form, not the seed."""
    for name in layer.flylora_A_cols:
        A = layer.flylora_A[name]
        layer.flylora_A[name] = densify(layer.flylora_A_cols[name], layer.flylora_A_vals[name], A.shape[1]).to(A)


class _SparseFormDict(Fp32BufferDict):
    """A BufferDict for A's sparse form (cols or vals) that re-densifies A when a loader assigns a
    tensor with setattr: transformers' native adapter loading (`from_pretrained(adapter_dir)`,
    `load_adapter`) sets each buffer that way, bypassing load_state_dict and so the post-hook above.
    The layer is held as a plain attribute (not a submodule), so deepcopy maps it to the copy."""

    def __init__(self, layer: "FlyLoraLayer"):
        super().__init__(persistent=True)
        object.__setattr__(self, "_layer", layer)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        layer = self.__dict__.get("_layer")
        if layer is None or name not in self._buffers:
            return
        mods = layer.__dict__["_modules"]
        cols, vals, dense = (mods.get(a, {}) for a in ("flylora_A_cols", "flylora_A_vals", "flylora_A"))
        if name in cols and name in vals and name in dense and cols[name].shape == vals[name].shape:
            A = dense[name]  # the other half may still be the seed's until it is assigned too
            dense[name] = densify(cols[name], vals[name].to(cols[name].device), A.shape[1]).to(A)


def merge_blocker_text(k: int, r: int) -> str:
    return (
        f"FlyLoRA with k={k} < r={r} routes every token to its own top-k experts, so the update depends "
        f"on the input and has no single ΔW to fold into W0; only k = r merges exactly (for task merging "
        f"use flylora.merge, which works in ΔW space or keeps routing)"
    )


class FlyLoraModel(ProjectionTunerMixin, AdapterTuner):
    prefix = "flylora_"
    tuner_layer_cls = FlyLoraLayer
    layer_cls = FlyLoraLayer

    def _attach(self, layer: FlyLoraLayer) -> None:
        if getattr(self, "_routing_context", None) is None:
            self._routing_context = _RoutingContext()
        layer.routing_context = self._routing_context

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        if getattr(self, "_mask_hook", None) is None:
            self._attach_existing_layers(model)
            self._mask_hook = model.register_forward_pre_hook(self._capture_attention_mask, with_kwargs=True)
        self._projection_injected(config, adapter_name)  # fresh seeds to agree on; fingerprint check
        if getattr(self, "_micro_batch_hook", None) is None:
            self._micro_batch_update = AfterBackward(self._update_micro_batch_biases)
            self._micro_batch_hook = model.register_forward_hook(self._arm_micro_batch_update)

    def _arm_micro_batch_update(self, module, args, output):
        """In a training forward with grad, arrange the "micro_batch" bias update for after its
        backward (layers.routing.AfterBackward). Cheap when no adapter uses that cadence."""
        if module.training and torch.is_grad_enabled() and any(
            c.bias_update_every == "micro_batch" for c in self.peft_config.values() if isinstance(c, FlyLoraConfig)
        ):
            self._micro_batch_update.arm(output)

    def _update_micro_batch_biases(self) -> None:
        from ..balance import update_routing_bias  # balance imports this module

        update_routing_bias(self, cadence="micro_batch")

    def _attach_existing_layers(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, FlyLoraLayer) and module.routing_context is None:
                self._attach(module)

    def _capture_attention_mask(self, module, args, kwargs):
        if getattr(self, "_pending_seed_sync", None) and module.training and torch.is_grad_enabled():
            self._sync_pending_seeds()  # adapters created before init_process_group: take rank 0's A
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and torch.is_tensor(args[1]):
            mask = args[1]
        ctx = getattr(self, "_routing_context", None)
        if ctx is not None:
            ctx.token_mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        if getattr(self, "_mask_hook", None) is not None:
            self._mask_hook.remove()
            self._mask_hook = None
        if getattr(self, "_micro_batch_hook", None) is not None:
            self._micro_batch_hook.remove()
            self._micro_batch_hook = None
        return model

    def merge_blocker(self, config: FlyLoraConfig) -> Optional[str]:
        return merge_blocker_text(config.k, config.r) if config.k < config.r else None


register_method("flylora", FlyLoraConfig, FlyLoraModel)
