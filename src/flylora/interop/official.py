"""Official FlyLoRA checkpoints (gfyddha/FlyLoRA, the authors' fork of PEFT 0.15) <-> flylora adapters.

The official layout, per adapted nn.Linear `<module>` (W0 ∈ R^{m×n}, total rank r, top-k k):
    base_model.model.<module>.lora_A.weight   (r, n)  A, stored dense (zeros included), frozen
    base_model.model.<module>.lora_B.weight   (m, r)  B, the trained tensor
    base_model.model.<module>.lora_topk_bias  (r,)    d, the load-balancing bias
and `adapter_config.json` is the fork's LoraConfig with `"peft_type": "LORA"`,
`"init_lora_weights": "sparse"`, `"top_k"` (k) and `"bias_u"` (u). Its forward (lora/layer.py):
    y = A x ;  I = top-k_i (y + d)  (signed) ;  f(x) = W0 x + (α/r) · B (mask_I ⊙ y)
which is flylora's FlyLoRA with `topk_on="signed"`. So conversion is a change of layout only:
  * from official: A is kept exactly, as flylora's sparse form (`save_projection=True`); B and d
    are copied; the outputs equal the official forward to fp32 rounding (bit-identical when α/r
    is a power of two).
  * to official: A is written dense (from the file's sparse form, else regenerated from the seed
    by flylora's own layer code), B and d copied.
What has no equivalent is refused with one line (see `_refuse_official_config`, `to_official`).

Bias cadence: the official code updates d by u·sign(mean(c) − c) in *every forward* of every
adapted layer (training micro-batches, and eval/generation too). A converted adapter keeps
u = bias_u and, where flylora's FlyLoraConfig offers it, `bias_update_every="micro_batch"` (one
update per training micro-batch, never in eval); see docs/interop.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .detect import TOPK_BIAS_KEY, is_official_config

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# the fork's LoraConfig fields (PEFT 0.15.2.dev0 plus its `# modified` top_k / bias_u), written as
# the fork's own save_pretrained would, so the authors' code loads our adapters without warnings
_OFFICIAL_DEFAULTS = {
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
    "corda_config": None, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
    "inference_mode": True, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
    "loftq_config": {}, "lora_bias": False, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "rank_pattern": {}, "revision": None, "task_type": "CAUSAL_LM",
    "trainable_token_indices": None, "use_dora": False, "use_rslora": False,
}  # fmt: skip


# ----------------------------------------------------------------------------- reading folders
def _read_config(src: Path) -> dict:
    path = src / CONFIG
    if not src.is_dir():
        raise FileNotFoundError(f"adapter folder {str(src)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: not an adapter folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is corrupt ({e})") from None


def _read_weights(src: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if (src / WEIGHTS).is_file():
        return load_file(str(src / WEIGHTS))
    if (src / "adapter_model.bin").is_file():
        state = torch.load(str(src / "adapter_model.bin"), map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            return state
    raise FileNotFoundError(f"{str(src)!r} holds no adapter weights ({WEIGHTS} or adapter_model.bin)")


def _by_module(tensors: dict, names: tuple[str, ...], src: Path) -> dict[str, dict]:
    """{module: {tensor name: tensor}} for keys `base_model.model.<module>.<name>`; any other key
    is refused (it belongs to something the other format has no place for)."""
    out: dict[str, dict] = {}
    for key, t in tensors.items():
        hit = next((n for n in names if key.startswith(PREFIX) and key.endswith("." + n)), None)
        if hit is None:
            raise ValueError(f"{src}: tensor {key!r} has no counterpart in the other format (expected only "
                             f"base_model.model.<module>.{{{', '.join(names)}}})")
        out.setdefault(key[len(PREFIX): -len(hit) - 1], {})[hit] = t
    if not out:
        raise ValueError(f"{src}: the adapter holds no tensors")
    return out


# ----------------------------------------------------------------------------- official -> flylora
def _refuse_official_config(cfg: dict, src: Path) -> None:
    """One line for each official/LoRA feature flylora's FlyLoRA has no equivalent of."""
    checks = [
        (cfg.get("use_dora"), "use_dora=True (DoRA)"),
        (cfg.get("use_rslora"), "use_rslora=True (scaling α/√r; flylora scales by lora_alpha/r)"),
        (cfg.get("rank_pattern"), "a rank_pattern (per-module ranks)"),
        (cfg.get("alpha_pattern"), "an alpha_pattern (per-module alphas)"),
        (cfg.get("lora_bias"), "lora_bias=True (a bias on lora_B)"),
        (cfg.get("bias", "none") != "none", f"bias={cfg.get('bias')!r} (trained base-layer biases)"),
        (cfg.get("fan_in_fan_out"), "fan_in_fan_out=True (Conv1D layers; flylora adapts nn.Linear)"),
        (cfg.get("modules_to_save"), "modules_to_save (fully trained extra modules)"),
        (cfg.get("layer_replication"), "layer_replication"),
        (cfg.get("trainable_token_indices"), "trainable_token_indices"),
    ]
    for bad, what in checks:
        if bad:
            raise ValueError(f"{src}: {what} has no flylora FlyLoRA equivalent; not converted")


def _sparse_rows(A, p: int):
    """A (r, n) dense -> (cols (r, p) int32 sorted, vals (r, p) fp32) with densify(cols, vals) == A.

    Rows with fewer than p nonzeros are padded with zero-valued entries at columns where A is 0,
    so the dense A is unchanged (and no column repeats within a row)."""
    import torch

    r, n = A.shape
    cols = torch.empty(r, p, dtype=torch.int32)
    for i in range(r):
        nz = torch.nonzero(A[i], as_tuple=True)[0]
        if nz.numel() < p:
            zeros = torch.nonzero(A[i] == 0, as_tuple=True)[0][: p - nz.numel()]
            nz = torch.cat([nz, zeros])
        cols[i] = nz.sort().values.to(torch.int32)
    vals = A.float().gather(1, cols.long())  # (r, p)
    return cols, vals


def _common_sparsity(modules: dict[str, dict]) -> float:
    """One `sparsity` ρ whose p = round(ρ·n) covers every row of every module's A.

    The official init has p = n // (r // k) nonzeros per row; flylora's is round(ρ·n). The largest
    nonzero fraction over the modules gives round(ρ·n_l) >= that module's nonzeros for every l."""
    rho = 0.0
    for t in modules.values():
        A = t["lora_A.weight"]
        nnz = int((A != 0).sum(dim=1).max())
        rho = max(rho, max(nnz, 1) / A.shape[1])
    return min(rho, 1.0)


def from_official(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write the official checkpoint `src` as a flylora FlyLoRA adapter folder `out`.

    Returns a summary {modules, r, k, lora_alpha, sparsity, bias_update_rate, out}."""
    import torch

    from ..layers.flylora import check_hyperparameters
    from ..tuners.flylora import FlyLoraConfig, FlyLoraLayer

    src = Path(src)
    cfg = _read_config(src)
    tensors = _read_weights(src)
    if not is_official_config(cfg) and not any(k.endswith(TOPK_BIAS_KEY) for k in tensors):
        raise ValueError(f"{src}: not an official FlyLoRA checkpoint (peft_type={cfg.get('peft_type')!r}, "
                         f"init_lora_weights={cfg.get('init_lora_weights')!r}, no top_k/bias_u, no {TOPK_BIAS_KEY})")
    _refuse_official_config(cfg, src)
    if any("lora_embedding" in k for k in tensors):
        raise ValueError(f"{src}: embedding LoRA (lora_embedding_A/B) has no flylora FlyLoRA equivalent; not converted")
    if any(k.endswith("lora_B.bias") for k in tensors):
        raise ValueError(f"{src}: lora_bias (lora_B.bias) has no flylora FlyLoRA equivalent; not converted")
    modules = _by_module(tensors, ("lora_A.weight", "lora_B.weight", TOPK_BIAS_KEY), src)
    r, k = int(cfg.get("r", 8)), int(cfg.get("top_k", 8))  # the fork's defaults
    alpha = cfg.get("lora_alpha", 8)
    for name, t in modules.items():
        missing = {"lora_A.weight", "lora_B.weight", TOPK_BIAS_KEY} - set(t)
        if missing:
            raise ValueError(f"{src}: module {name!r} lacks {sorted(missing)}")
        A, B, d = t["lora_A.weight"], t["lora_B.weight"], t[TOPK_BIAS_KEY]
        if A.dim() != 2 or A.shape[0] != r or B.dim() != 2 or B.shape[1] != r or tuple(d.shape) != (r,):
            raise ValueError(f"{src}: module {name!r} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}, "
                             f"{TOPK_BIAS_KEY} {tuple(d.shape)}; expected (r, n), (m, r), (r,) with r={r}")
    rho = _common_sparsity(modules)
    kwargs = dict(
        r=r, k=k, lora_alpha=alpha, lora_dropout=float(cfg.get("lora_dropout", 0.0)), topk_on="signed",
        bias_update_rate=float(cfg.get("bias_u", 0.01)), sparsity=rho, save_projection=True, projection_seed=0,
        target_modules=sorted(modules), base_model_name_or_path=cfg.get("base_model_name_or_path"),
        task_type=cfg.get("task_type") or "CAUSAL_LM", inference_mode=True,
    )
    if "bias_update_every" in FlyLoraConfig.__dataclass_fields__:
        kwargs["bias_update_every"] = "micro_batch"  # the official cadence: every training forward
    config = FlyLoraConfig(**kwargs)
    ours = {}
    for name, t in modules.items():
        A = t["lora_A.weight"]
        p = check_hyperparameters(r, k, rho, A.shape[1])
        cols, vals = _sparse_rows(A, p)
        ours[f"{PREFIX}{name}.flylora_A_cols"] = cols
        ours[f"{PREFIX}{name}.flylora_A_vals"] = vals
        ours[f"{PREFIX}{name}.flylora_B"] = t["lora_B.weight"].contiguous().clone()
        ours[f"{PREFIX}{name}.flylora_bias"] = t[TOPK_BIAS_KEY].to(torch.float32).contiguous().clone()
        if "flylora_seed" in FlyLoraLayer.other_param_names:  # the layer's record of A's seed (A is in the file)
            ours[f"{PREFIX}{name}.flylora_seed"] = torch.tensor([config.projection_seed], dtype=torch.int64)
    _write(out, config, ours, overwrite)
    return {"modules": len(modules), "r": r, "k": k, "lora_alpha": alpha, "sparsity": rho,
            "bias_update_rate": kwargs["bias_update_rate"], "out": str(out)}


def _write(out, config, tensors: dict, overwrite: bool) -> None:
    """adapter_config.json (a PeftConfig through its own save_pretrained, or a plain dict) and
    adapter_model.safetensors, into a temp folder renamed into place."""
    from safetensors.torch import save_file

    from ..merge.io import write_dir_atomically

    def write(tmp: Path) -> None:
        if isinstance(config, dict):
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})

    write_dir_atomically(out, write, overwrite=overwrite, kind="convert")


# ----------------------------------------------------------------------------- flylora -> official
def _in_features(base_model: str, module_names: list[str]) -> dict[str, int]:
    """in_features of each module of `base_model`, from its config on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(base_model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    found = dict(model.named_modules())
    out = {}
    for name in module_names:
        mod = found.get(name)
        if not isinstance(mod, torch.nn.Linear):
            raise ValueError(f"module {name!r} of the adapter is not an nn.Linear of base model {base_model!r}")
        out[name] = mod.in_features
    return out


def _dense_projection(config, name: str, n: int, m: int, tensors: dict):
    """A (r, n) as flylora computes it for module `name`: from the file's sparse form when saved,
    else from the seed, through flylora's own layer (so it follows whatever the layer does)."""
    import torch
    from torch import nn

    from ..layers.flylora import densify
    from ..tuners.flylora import FlyLoraLayer

    cols, vals = tensors.get(f"{PREFIX}{name}.flylora_A_cols"), tensors.get(f"{PREFIX}{name}.flylora_A_vals")
    if cols is not None and vals is not None:
        return densify(cols, vals.float(), n), None
    stub = nn.utils.skip_init(nn.Linear, n, m, bias=False, dtype=torch.float32)  # shapes only, no init
    layer = FlyLoraLayer(stub, "default", config, layer_key=name)
    seed = tensors.get(f"{PREFIX}{name}.flylora_seed")  # the seed this layer's A was built from
    if seed is not None and hasattr(layer, "adopt_projection_seed"):
        layer.adopt_projection_seed("default", int(seed.reshape(-1)[0]))
    digest = layer.projection_digest("default") if hasattr(layer, "projection_digest") else None
    # only A and its digest are kept: the stub's (m, n) weight is freed with the layer
    return layer.flylora_A["default"].detach().float().clone(), _Digest(name, digest)


class _Digest:
    """What `adapter_fingerprint` reads of a layer: its key and the digest of its A."""

    def __init__(self, layer_key: str, digest):
        self.layer_key, self._digest = layer_key, digest

    def projection_digest(self, name: str):
        return self._digest


def _check_fingerprint(config, layers: list) -> None:
    """A regenerated here from the seed must be the A that was trained (torch's CPU randn is not
    bit-stable across CPUs/releases): compare with the fingerprint save_pretrained recorded."""
    want = getattr(config, "projection_fingerprint", None)
    if want is None or not layers or any(layer.projection_digest("default") is None for layer in layers):
        return
    from ..tuners.projection import adapter_fingerprint, mismatch_text

    got = adapter_fingerprint(layers, "default")
    if got is not None and got != want:
        raise ValueError(mismatch_text("default", config.projection_seed, want, got))


def to_official(
    src: str | os.PathLike, out: str | os.PathLike, *, base_model: str | None = None, overwrite: bool = False
) -> dict:
    """Write the flylora FlyLoRA (or LoRA-FA) adapter `src` in the official checkpoint layout.

    `base_model` (default: the adapter's base_model_name_or_path) gives the in_features of each
    module (A's width is not stored in flylora's sparse form); only its config is read."""
    import torch
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import flylora.tuners  # noqa: F401  (registers the methods)

    src = Path(src)
    raw = _read_config(src)
    peft_type = str(raw.get("peft_type", ""))
    if is_official_config(raw):
        raise ValueError(f"{src}: already an official FlyLoRA checkpoint; use --from official to get a flylora adapter")
    if peft_type not in ("FLYLORA", "LORA_FA"):
        raise ValueError(f"{src}: peft_type={peft_type!r} has no official FlyLoRA form; "
                         "only FLYLORA and LORA_FA (FlyLoRA with k = r) adapters convert")
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(str(src))
    if config.topk_on != "signed":
        raise ValueError(f"{src}: topk_on={config.topk_on!r} has no official equivalent (the authors' PEFT "
                         "path selects the top-k of the signed A x + d); not converted")
    if config.modules_to_save:
        raise ValueError(f"{src}: modules_to_save has no place in the official FlyLoRA layout; not converted")
    tensors = _read_weights(src)
    names = ("flylora_B", "flylora_bias", "flylora_A_cols", "flylora_A_vals", "flylora_seed")
    modules = _by_module(tensors, names, src)
    base = base_model or config.base_model_name_or_path
    if not base:
        raise ValueError(f"{src}: no base_model_name_or_path recorded; pass --base-model")
    widths = _in_features(base, sorted(modules))
    r, k = config.r, config.k
    official, regenerated = {}, []
    for name, t in sorted(modules.items()):
        B = t["flylora_B"]
        A, layer = _dense_projection(config, name, widths[name], B.shape[0], tensors)
        if layer is not None:
            regenerated.append(layer)
        official[f"{PREFIX}{name}.lora_A.weight"] = A.contiguous()
        official[f"{PREFIX}{name}.lora_B.weight"] = B.contiguous().clone()
        d = t.get("flylora_bias")
        official[f"{PREFIX}{name}.{TOPK_BIAS_KEY}"] = (torch.zeros(r) if d is None else d.float()).contiguous().clone()
    if len(regenerated) == len(modules):
        _check_fingerprint(config, regenerated)
    cfg = dict(_OFFICIAL_DEFAULTS)
    cfg.update(
        peft_type="LORA", init_lora_weights="sparse", r=r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, top_k=k, bias_u=float(config.bias_update_rate),
        target_modules=sorted(modules), base_model_name_or_path=str(base),
        task_type=config.task_type or "CAUSAL_LM",
    )
    _write(out, cfg, official, overwrite)
    return {"modules": len(modules), "r": r, "k": k, "lora_alpha": config.lora_alpha,
            "bias_u": cfg["bias_u"], "out": str(out)}
