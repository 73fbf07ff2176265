"""The experiment spec (flylora.pipeline.experiment runs it): its dataclasses, strict loading,
the training recipe of each (method, task, seed), and which merges apply to which method.

The spec (validated strictly, like recipes; one line naming a bad key):

    name: cpu_merge
    recipe: recipes/cpu/base.yaml        # base training recipe: a path (relative to the spec) or a mapping
    methods:                             # label -> recipe overrides (dotted keys, as on the train CLI)
      flylora: {method.name: flylora, method.config: {r: 32, k: 8, lora_alpha: 64}}
      lora_r8: {method.name: lora, method.config: {r: 8, lora_alpha: 16}}
    tasks: [glue:sst2, commonsense:boolq]
    seeds: [0, 1]                        # train.seed (FlyLoRA's A is derived from seed and task)
    eval: {limit: 100, mode: loglik, batch_size: 16, bf16_autocast: true}
    merges:                              # label -> flylora merge options
      weight_average: {method: weight_average}
      routed_union: {method: routed_union, only: [flylora]}
    analysis: [weight_average]           # interference analysis (first seed): true, false or merge labels
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .recipe import _build, apply_overrides, load_recipe, read_yaml

ROUTED_TYPES = ("flylora",)  # adapter methods whose ΔW merges drop input-dependent routing
DELTA_OK = ("lora", "adalora", "flylora", "lora_fa")
UNION_OK = ("lora", "flylora", "lora_fa", "split_lora", "hydralora", "moelora", "toplora")


@dataclass
class EvalSpec:
    split: Optional[str] = None  # default: carved-test for carved-train/carved-fit runs, else test
    limit: Optional[int] = 100
    limit_seed: Optional[int] = None
    mode: str = "generate"  # generate (the paper's protocol) or loglik (multiple choice)
    batch_size: int = 16
    bf16_autocast: bool = True
    max_new_tokens: Optional[int] = None
    include_base: bool = True
    task_map: dict = field(default_factory=dict)  # training task -> evaluation task (code_alpaca: humaneval)
    per_task: dict = field(default_factory=dict)  # evaluation task -> extra evaluate() kwargs


@dataclass
class MergeSpec:
    method: str = "weight_average"
    weights: Optional[list[float]] = None
    density: float = 0.5
    majority: str = "total"
    seed: int = 0
    dare_combine: str = "sum"
    knots_merge: str = "ties"
    format: str = "auto"
    rank: Optional[int] = None
    legacy_form: str = "routed"
    only: Optional[list[str]] = None  # method labels this merge applies to (default: all it supports)


@dataclass
class ExperimentSpec:
    name: str = "experiment"
    description: str = ""
    recipe: Any = None  # path or mapping
    methods: dict = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)  # training tasks
    task_overrides: dict = field(default_factory=dict)  # training task -> recipe overrides (epochs, lr, ...)
    seeds: list[int] = field(default_factory=lambda: [0])
    eval: EvalSpec = field(default_factory=EvalSpec)
    merges: dict = field(default_factory=dict)
    analysis: Union[bool, list[str]] = True  # interference analysis (first seed): all merges, none, or these labels
    analysis_prompts: int = 16
    output_dir: str = "runs/experiments/{name}"
    train_dir: Optional[str] = None  # training runs (default <output_dir>/train); specs sharing it share adapters
    keep_full_weights: bool = False  # full-weight merges are deleted after evaluation (they are big)
    threads: Optional[int] = None

    @property
    def out(self) -> Path:
        return Path(self.output_dir.replace("{name}", self.name))

    @property
    def train_root(self) -> Path:
        return Path(self.train_dir.replace("{name}", self.name)) if self.train_dir else self.out / "train"

    def eval_task(self, task: str) -> str:
        return self.eval.task_map.get(task, task)

    @property
    def eval_tasks(self) -> list[str]:
        return [self.eval_task(t) for t in self.tasks]


def slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-")


def read_spec_source(source: str | os.PathLike | dict, overrides: list[str] | dict | None = None) -> tuple[dict, Path]:
    """(spec dict with overrides applied and `name` defaulting to the file's stem, folder that
    relative paths in it resolve from) for a YAML path or an already-parsed dict."""
    if isinstance(source, dict):
        return apply_overrides(source, overrides), Path(".")
    data = read_yaml(source)
    data.setdefault("name", Path(source).stem)
    return apply_overrides(data, overrides), Path(source).parent


def load_spec(source: str | os.PathLike | dict, overrides: list[str] | dict | None = None) -> tuple[ExperimentSpec, dict]:
    """(validated spec, base recipe dict). A relative `recipe:` path is relative to the spec file."""
    from ..merge.cli import METHODS as MERGE_METHODS

    data, base_dir = read_spec_source(source, overrides)
    spec = _build(ExperimentSpec, data, "spec")
    merges = {}
    for label, m in spec.merges.items():
        merges[label] = _build(MergeSpec, m or {}, f"spec.merges.{label}")
        if merges[label].method not in MERGE_METHODS:
            raise ValueError(f"spec.merges.{label}.method: {merges[label].method!r} is not allowed "
                             f"(allowed: {', '.join(MERGE_METHODS)})")
    spec.merges = merges
    if not spec.tasks or not spec.methods:
        raise ValueError("spec: needs at least one of each of `tasks` and `methods`")
    if not spec.seeds:
        raise ValueError("spec.seeds: needs at least one seed")
    from ..tasks import get_task

    for t in spec.tasks + spec.eval_tasks:
        get_task(t)
    for key, label in ((spec.task_overrides, "spec.task_overrides"), (spec.eval.task_map, "spec.eval.task_map")):
        unknown = sorted(set(key) - set(spec.tasks))
        if unknown:
            raise ValueError(f"{label}: {unknown} are not among spec.tasks {spec.tasks}")
    unknown = sorted(set(spec.eval.per_task) - set(spec.eval_tasks))
    if unknown:
        raise ValueError(f"spec.eval.per_task: {unknown} are not among the evaluation tasks {spec.eval_tasks}")
    if len(set(spec.eval_tasks)) != len(spec.eval_tasks):
        raise ValueError(f"spec: two training tasks map to the same evaluation task ({spec.eval_tasks})")
    if spec.eval.mode not in ("generate", "loglik"):
        raise ValueError(f"spec.eval.mode: {spec.eval.mode!r} is not allowed (allowed: generate, loglik)")
    if isinstance(spec.recipe, str):
        path = Path(spec.recipe)
        recipe = read_yaml(path if path.is_absolute() or path.is_file() else base_dir / path)
    elif isinstance(spec.recipe, dict):
        recipe = spec.recipe
    else:
        raise ValueError(f"spec.recipe: expected a recipe path or mapping, got {spec.recipe!r}")
    for label, overrides in spec.methods.items():
        if not isinstance(overrides, dict):
            raise ValueError(f"spec.methods.{label}: expected a mapping of recipe overrides, got {overrides!r}")
        if "/" in label or not label:
            raise ValueError(f"spec.methods: bad label {label!r}")
        # validate every (method, task) recipe now, before hours of training
        for task in spec.tasks:
            try:
                load_recipe(recipe_for(recipe, overrides, task, spec.seeds[0], Path("/tmp/x"), label,
                                       spec.task_overrides.get(task)))
            except ValueError as e:
                raise ValueError(f"spec.methods.{label}: {e}") from None
        for mlabel, m in spec.merges.items():
            if m.only is not None and not set(m.only) <= set(spec.methods):
                raise ValueError(f"spec.merges.{mlabel}.only: unknown method labels "
                                 f"{sorted(set(m.only) - set(spec.methods))}")
    return spec, recipe


def recipe_for(base: dict, overrides: dict, task: str, seed: int, run_dir: Path, label: str,
               task_overrides: dict | None = None) -> dict:
    data = apply_overrides(apply_overrides(base, overrides), task_overrides or {})
    return apply_overrides(data, {"name": f"{label}-{slug(task)}-s{seed}", "data.task": task,
                                  "train.seed": seed, "output.dir": str(run_dir), "output.overwrite": False,
                                  "output.resume": "auto"})


def merge_applies(merge: MergeSpec, label: str, method_name: str) -> str | None:
    """None if the merge applies to this adapter method, else the reason it does not."""
    if merge.only is not None:
        return None if label in merge.only else "not selected (only:)"
    if merge.method in ("weight_average", "task_arithmetic", "ties", "dare", "knots") and method_name not in DELTA_OK:
        return f"{method_name} has no ΔW = B·A factors"
    if merge.method == "routed_union" and method_name not in UNION_OK:
        return f"routed union does not support {method_name}"
    return None


def _spec_dict(spec: ExperimentSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["merges"] = {k: dataclasses.asdict(v) for k, v in spec.merges.items()}
    return d
