"""Routed union: T task adapters kept side by side in one artifact, all active at once.

For FlyLoRA every task keeps its own frozen A_i, routing bias d_i and top-k, so

    f(x) = W0 x + Σ_i w_i · (α/r) · B_i (mask_i(x) ⊙ A_i x),   mask_i = top-k(A_i x + d_i)

i.e. each task's own *routed* update, scaled by w_i (1/T by default: the routed analogue of
paper Eq. 12's averaging). PEFT's multi-active-adapter forward sums each active adapter's delta,
so the artifact is simply each task's adapter with B_i pre-multiplied by w_i (every method here
is linear in its B tensors), plus a manifest:

    <dir>/routed_union.json   {"format": "flylora-routed-union", "version": 1, "method": "routed_union",
                               "peft_type", "tasks", "adapter_names", "weights", "adapters": {name: subdir}}
    <dir>/<subdir>/           adapter_config.json + adapter_model.safetensors per task

`load_routed_union(base_model, path)` returns a PeftModel with all T adapters active. With one
task and weight 1 the result is that task's adapter, bit for bit. For plain LoRA the union equals
task arithmetic; for Split-LoRA/HydraLoRA/MoE-LoRA/TopLoRA it keeps every task's router.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch

from flylora.merge.io import ADAPTER_WEIGHTS, write_dir_atomically

MANIFEST = "routed_union.json"
FORMAT = "flylora-routed-union"
# the tensor each method's delta is linear in (the per-adapter key is `<module>.<attr>` in the file)
B_TENSORS = {"LORA": "lora_B", "FLYLORA": "flylora_B", "LORA_FA": "flylora_B", "SPLITLORA": "splitlora_B",
             "HYDRALORA": "hydralora_B", "MOELORA": "moelora_B", "TOPLORA": "toplora_B"}


def adapter_name_for(task: str) -> str:
    """A PEFT-safe adapter name (no '.') that is also a safe folder name."""
    name = re.sub(r"[^\w-]+", "-", task).strip("-")
    if not name:
        raise ValueError(f"task name {task!r} gives an empty adapter name")
    return name


def _read_config(path: Path) -> dict:
    from flylora.loading import check_adapter_dir

    return check_adapter_dir(str(path))


def _scale_b(tensors: dict[str, torch.Tensor], attr: str, w: float) -> dict[str, torch.Tensor]:
    out, hit = {}, False
    for key, t in tensors.items():
        if key.endswith(f".{attr}") or f".{attr}." in key:
            hit = True
            # w·B in fp32 then back to the file's dtype; w = 1 leaves every bit unchanged
            t = (t.to(torch.promote_types(t.dtype, torch.float32)) * w).to(t.dtype) if w != 1.0 else t
        out[key] = t.contiguous()
    if not hit:
        raise ValueError(f"no {attr} tensors in the adapter file; cannot scale it")
    return out


def write_routed_union(adapters: Sequence[tuple[str, str | os.PathLike]], out_dir: str | os.PathLike,
                       weights: Sequence[float] | None = None, *, overwrite: bool = False) -> Path:
    """Write the routed union of [(task name, adapter folder), ...]; weights default to 1/T."""
    from safetensors.torch import load_file, save_file

    if not adapters:
        raise ValueError("routed union needs at least one adapter")
    T = len(adapters)
    w = [1.0 / T] * T if weights is None else [float(x) for x in weights]
    if len(w) != T or not all(math.isfinite(x) for x in w):
        raise ValueError(f"need {T} finite weights for {T} adapters, got {list(weights or [])}")
    names = [adapter_name_for(t) for t, _ in adapters]
    if len(set(names)) != T:
        raise ValueError(f"task names must be distinct (as adapter names), got {[t for t, _ in adapters]}")
    configs = [_read_config(Path(p)) for _, p in adapters]
    types = {c.get("peft_type") for c in configs}
    if len(types) != 1:
        raise ValueError(f"a routed union needs adapters of one method; got peft types {sorted(map(str, types))}")
    peft_type = types.pop()
    if peft_type not in B_TENSORS:
        raise ValueError(f"routed union supports {', '.join(sorted(B_TENSORS))}; got {peft_type!r}")
    for (task, path), c in zip(adapters, configs):
        if not (Path(path) / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path}: routed union needs {ADAPTER_WEIGHTS}")

    def write(tmp: Path) -> None:
        for name, (task, path), wi in zip(names, adapters, w):
            sub = tmp / name
            sub.mkdir()
            shutil.copy2(Path(path) / "adapter_config.json", sub / "adapter_config.json")
            tensors = _scale_b(load_file(str(Path(path) / ADAPTER_WEIGHTS)), B_TENSORS[peft_type], wi)
            save_file(tensors, str(sub / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        manifest = {"format": FORMAT, "version": 1, "method": "routed_union", "peft_type": peft_type,
                    "tasks": [t for t, _ in adapters], "adapter_names": names, "weights": w,
                    "adapters": {n: n for n in names}, "sources": [str(p) for _, p in adapters],
                    "base_model_name_or_path": configs[0].get("base_model_name_or_path")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return write_dir_atomically(out_dir, write, overwrite=overwrite)


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST} (not a routed union written by flylora merge)")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: corrupt manifest ({e.msg})") from None
    if m.get("format") != FORMAT or not isinstance(m.get("adapters"), dict) or not m["adapters"]:
        raise ValueError(f"{p}: not a {FORMAT} manifest")
    return m


def is_routed_union(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_routed_union(base_model, path: str | os.PathLike):
    """A PeftModel on `base_model` with every task adapter of the union active at once (eval mode)."""
    from flylora.loading import load_adapter

    m = read_manifest(path)
    model = base_model
    names = list(m["adapters"])
    for name in names:
        model = load_adapter(model, str(Path(path) / m["adapters"][name]), adapter_name=name)
    # several active adapters: PEFT's forward adds each one's own (routed) delta
    model.base_model.set_adapter(names if len(names) > 1 else names[0], inference_mode=True)
    return model.eval()
