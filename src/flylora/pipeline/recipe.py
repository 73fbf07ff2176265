"""Training recipes: a small dataclass tree, validated strictly.

    recipe = load_recipe("recipes/cpu/flylora_smollm2.yaml", ["train.lr=1e-3", "data.limit=64"])

Rules
- Every key must be a field of its section; an unknown key fails with ONE line naming it and
  the allowed keys: `unknown key recipe.model.foo (allowed: dtype, name_or_path)`.
- Every value must have the field's type: `recipe.train.lr: expected float, got 'abc'`
  (an int is accepted where a float is expected; nothing else is coerced).
- Overrides `a.b=value` are parsed as YAML scalars (`1e-3` → float, `true` → bool, `null` → None,
  `[q_proj, v_proj]` → list) and applied before validation, so they get the same checks.
- `method.config` is checked against the chosen method's config class (its dataclass fields and
  their annotated types), so a typo there is caught before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..defaults import DEFAULT_MODEL

# method name -> (module, config class); imported lazily so `flylora train --help` stays fast
METHODS: dict[str, tuple[str, str]] = {
    "flylora": ("flylora", "FlyLoraConfig"),
    "lora": ("peft", "LoraConfig"),
    "adalora": ("peft", "AdaLoraConfig"),
    "lora_fa": ("flylora", "LoraFaConfig"),
    "toplora": ("flylora", "TopLoraConfig"),
    "moelora": ("flylora", "MoeLoraConfig"),
    "split_lora": ("flylora", "SplitLoraConfig"),
    "hydralora": ("flylora", "HydraLoraConfig"),
}
PRECISIONS = ("fp32", "bf16", "fp16")
TRAIN_SPLITS = ("train", "carved-train", "carved-fit")  # carved-fit: carved-train minus carved-val
RIEMANNIAN = ("riemannian_adamw", "riemannian_sgd")


@dataclass
class ModelSection:
    """The frozen base model."""

    name_or_path: str = DEFAULT_MODEL  # HF id, local path, or an `embedded:` name
    dtype: str = "float32"  # storage dtype of the base weights (float32, bfloat16, float16)
    quantization: str = "none"  # none, nf4, fp4 or int8: bitsandbytes W0 of the linear layers (quantization.py)
    compute_dtype: Optional[str] = None  # 4-bit only: dtype of the dequantized matmul; null = dtype
    double_quant: bool = False  # 4-bit only: also quantize the quantization constants (QLoRA)


@dataclass
class MethodSection:
    """Which adapter, with the keyword arguments of its config class (e.g. FlyLoraConfig)."""

    name: str = "flylora"
    config: dict = field(default_factory=dict)


@dataclass
class DataSection:
    """Training data: a registered task (flylora.tasks) and how to tokenize it."""

    task: str = "mmlu"
    split: str = "train"  # train, or carved-train (offline stand-in; evaluate on carved-test)
    path: Optional[str] = None  # local data file/folder instead of the shipped/hub copy
    limit: Optional[int] = None  # keep N rows (the first N, or a random N with limit_seed)
    limit_seed: Optional[int] = None
    carve_seed: int = 0
    carve_fraction: float = 0.5
    cutoff_len: int = 256
    train_on_inputs: bool = True  # official FlyLoRA code: loss on the whole prompt too
    add_eos: bool = True
    template: Optional[str] = None  # default: the task's own template
    chat_template: bool = False
    truncation: str = "keep_target"


@dataclass
class TrainSection:
    """Optimisation. Batch = micro_batch_size × gradient_accumulation × processes."""

    lr: float = 3e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs (optimizer steps)
    micro_batch_size: int = 8
    gradient_accumulation: int = 1
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # wins over warmup_ratio when > 0
    lr_scheduler: str = "linear"
    lr_scheduler_kwargs: dict = field(default_factory=dict)  # e.g. polynomial: {lr_end: 1.0e-6, power: 1.0}
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # null: no global clipping
    optimizer: str = "adamw_torch"  # any transformers `optim` name, or riemannian_adamw / riemannian_sgd
    optimizer_args: dict = field(default_factory=dict)  # extra kwargs of the Riemannian optimizers
    gate_lr: Optional[float] = None  # Riemannian only: own lr for routers/gates
    gate_max_norm: Optional[float] = None  # Riemannian only: clip router/gate gradients
    precision: str = "fp32"  # fp32, bf16 (autocast; works on CPU) or fp16 (CUDA)
    gradient_checkpointing: bool = False
    use_reentrant: bool = False
    seed: int = 0  # data order, dropout, LoRA's random A init; NOT FlyLoRA's A (method.config.projection_seed)
    data_seed: Optional[int] = None
    group_by_length: bool = False
    logging_steps: int = 10
    save_steps: int = 200  # checkpoint every N optimizer steps (for resuming)
    save_total_limit: Optional[int] = 2
    ddp_find_unused_parameters: bool = False
    ddp_broadcast_buffers: bool = False
    dataloader_num_workers: int = 0


@dataclass
class OutputSection:
    dir: str = "runs/train/{name}"  # `{name}` is replaced by the recipe name
    resume: str = "auto"  # auto (latest checkpoint if any), never, or a checkpoint folder
    overwrite: bool = False  # replace a finished run (or start over despite checkpoints)
    tensorboard: Optional[bool] = None  # null: on when the tensorboard package is installed
    progress: bool = True


@dataclass
class Recipe:
    name: str = "run"
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name))


# ---------------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "mapping"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def matches(value: Any, tp: Any) -> bool:
    """Does `value` (parsed YAML) have type `tp`? bool is not an int; an int is a float."""
    if tp is Any or tp is object:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is Union:
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation we cannot check (e.g. a forward reference): accept


def _build(cls: type, data: Any, path: str):
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown key {path}.{key} (allowed: {', '.join(sorted(fields))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{path}.{key}")
            continue
        if not matches(value, tp):
            raise ValueError(f"{path}.{key}: expected {_type_name(tp)}, got {value!r}")
        if tp is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _choice(path: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{path}: {value!r} is not allowed (allowed: {', '.join(map(str, allowed))})")


def _positive(path: str, value: float, strict: bool = True) -> None:
    if value <= 0 if strict else value < 0:
        raise ValueError(f"{path}: must be {'> 0' if strict else '>= 0'}, got {value!r}")


def method_config_class(name: str):
    import importlib

    _choice("recipe.method.name", name, METHODS)
    module, cls = METHODS[name]
    importlib.import_module("flylora")  # registers the flylora methods with PEFT

    return getattr(importlib.import_module(module), cls)


def check_method_config(name: str, config: dict) -> None:
    """Keys and (simple) value types of `method.config` against the method's config dataclass."""
    cls = method_config_class(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001  (a config class with unresolvable annotations: keys only)
        hints = {}
    for key, value in config.items():
        if key not in fields:
            raise ValueError(f"unknown key recipe.method.config.{key} for method {name!r} "
                             f"(allowed: {', '.join(sorted(fields))})")
        if key in hints and not matches(value, hints[key]):
            raise ValueError(f"recipe.method.config.{key}: expected {_type_name(hints[key])}, got {value!r}")


def validate(recipe: Recipe) -> Recipe:
    """Cross-field rules the types alone cannot express; each failure is one line."""
    from ..models import _DTYPES

    _choice("recipe.model.dtype", recipe.model.dtype, _DTYPES)
    from ..quantization import check_quantization

    m = recipe.model
    check_quantization(m.quantization, m.compute_dtype, m.double_quant, where="recipe.model.quantization")
    if m.compute_dtype is not None:
        _choice("recipe.model.compute_dtype", m.compute_dtype, _DTYPES)
    check_method_config(recipe.method.name, recipe.method.config)
    d, t, o = recipe.data, recipe.train, recipe.output
    _choice("recipe.data.split", d.split, TRAIN_SPLITS)
    _choice("recipe.data.truncation", d.truncation, ("keep_target", "right"))
    if d.limit is not None:
        _positive("recipe.data.limit", d.limit)
    if not 0.0 < d.carve_fraction < 1.0:
        raise ValueError(f"recipe.data.carve_fraction: must be in (0, 1), got {d.carve_fraction!r}")
    if d.cutoff_len < 2:
        raise ValueError(f"recipe.data.cutoff_len: must be >= 2, got {d.cutoff_len!r}")
    _positive("recipe.train.lr", t.lr)
    _positive("recipe.train.micro_batch_size", t.micro_batch_size)
    _positive("recipe.train.gradient_accumulation", t.gradient_accumulation)
    _positive("recipe.train.logging_steps", t.logging_steps)
    _positive("recipe.train.save_steps", t.save_steps)
    # values the Trainer would silently ignore or treat as "off"
    if t.save_total_limit is not None and t.save_total_limit < 1:
        raise ValueError(f"recipe.train.save_total_limit: must be >= 1 or null (keep all), got {t.save_total_limit!r}")
    if t.warmup_steps > 0 and t.warmup_ratio > 0:
        raise ValueError(f"recipe.train.warmup_ratio: {t.warmup_ratio!r} would be ignored because warmup_steps="
                         f"{t.warmup_steps} wins; set only one")
    if t.use_reentrant and not t.gradient_checkpointing:
        raise ValueError("recipe.train.use_reentrant: only used with gradient_checkpointing: true")
    if d.limit_seed is not None and d.limit is None:
        raise ValueError("recipe.data.limit_seed: only picks which rows data.limit keeps; set data.limit too")
    _positive("recipe.train.dataloader_num_workers", t.dataloader_num_workers, strict=False)
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        raise ValueError(f"recipe.train.max_grad_norm: must be > 0 or null (no clipping), got {t.max_grad_norm!r}")
    _positive("recipe.train.weight_decay", t.weight_decay, strict=False)
    _positive("recipe.train.warmup_steps", t.warmup_steps, strict=False)
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ValueError(f"recipe.train.epochs: must be > 0 when max_steps <= 0, got {t.epochs!r}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ValueError(f"recipe.train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio!r}")
    _choice("recipe.train.precision", t.precision, PRECISIONS)
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    _choice("recipe.train.lr_scheduler", t.lr_scheduler, [s.value for s in SchedulerType])
    _choice("recipe.train.optimizer", t.optimizer, [*RIEMANNIAN, *(o.value for o in OptimizerNames)])
    if t.optimizer not in RIEMANNIAN:
        for key in ("gate_lr", "gate_max_norm"):
            if getattr(t, key) is not None:
                raise ValueError(f"recipe.train.{key}: only used by the Riemannian optimizers, "
                                 f"not by {t.optimizer!r}")
        if t.optimizer_args:
            raise ValueError(f"recipe.train.optimizer_args: only used by the Riemannian optimizers; "
                             f"for {t.optimizer!r} use transformers' own settings")
    if o.resume not in ("auto", "never") and not Path(o.resume).is_dir():
        raise ValueError(f"recipe.output.resume: {o.resume!r} is neither auto, never nor a checkpoint folder")
    if not recipe.name or "/" in recipe.name:
        raise ValueError(f"recipe.name: must be a non-empty name without '/', got {recipe.name!r}")
    return recipe


# ---------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats: PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


# ---------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ValueError(f"override {text!r}: expected key.path=value (e.g. train.lr=1e-3)")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str] | dict | None) -> dict:
    """A deep copy of `data` with the overrides applied (dict form: {"train.lr": 1e-3})."""
    import copy

    out = copy.deepcopy(data)
    if not overrides:
        return out
    items = ([parse_override(o) for o in overrides] if isinstance(overrides, (list, tuple))
             else [(k.split("."), v) for k, v in overrides.items()])
    for keys, value in items:
        node = out
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ValueError(f"override {'.'.join(keys)}: recipe.{'.'.join(keys[:i + 1])} is not a mapping")
            node = nxt
        node[keys[-1]] = value
    return out


def yaml_error_line(path: str | Path, e: Exception) -> str:
    """`file:LINE:COL: invalid YAML: problem` (1-based, as editors count) for a YAML error."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe file {str(p)!r} not found")
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(yaml_error_line(p, e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | dict | None = None) -> Recipe:
    """A validated Recipe from a YAML path, a dict or a Recipe, with overrides applied.
    A YAML file without `name` is named after the file."""
    if isinstance(source, Recipe):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    else:
        data = read_yaml(source)
        data.setdefault("name", Path(source).stem)
    return validate(_build(Recipe, apply_overrides(data, overrides), "recipe"))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def first_difference(a: Any, b: Any, path: str = "recipe") -> tuple[str, Any, Any] | None:
    """(key path, a's value, b's value) of the first place two recipe dicts differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    return None if a == b else (path, a, b)
