"""A quantized frozen base (QLoRA-style) through bitsandbytes: `model.quantization` in recipes,
`--quantization` for `flylora eval`.

    none   the base in `model.dtype` (default)
    nf4    4-bit NormalFloat blocks (QLoRA)              bnb.nn.Linear4bit
    fp4    4-bit float blocks; what the official FlyLoRA scripts load (see below)
    int8   LLM.int8() with outlier threshold 6.0        bnb.nn.Linear8bitLt

Only the targeted linear layers' W0 is quantized (transformers keeps lm_head, embeddings and norms in
`model.dtype`); every adapter tensor stays a float tensor, so each method computes

    f(x) = Q(W0) x + delta(x)        Q(W0) x: bitsandbytes' kernel (dequantize, then matmul in the
                                     4-bit compute dtype; int8: vector-wise int8 matmul)

The official FlyLoRA `finetune.py`/`evaluate.py` build `BitsAndBytesConfig(load_in_8bit=False,
llm_int8_threshold=6.0)`; under their pinned transformers 4.44 any bitsandbytes config that is not
8-bit selects the 4-bit quantizer with its defaults: fp4, fp32 compute, no double quantization,
fp16 storage for the rest (`torch_dtype=float16`), followed by `prepare_model_for_kbit_training`.
The paper recipes (recipes/paper/) reproduce that: `quantization: fp4, compute_dtype: float32`.

Merging into a quantized W0 is refused (`merge_blocker`): requantizing W0 + ΔW rounds every weight
to the 4-bit (or int8) grid again, an error of the order of the quantization step itself, which
for a trained adapter is larger than ΔW (tests/test_quantized.py measures it), and unmerging would
not give W0 back. Merge into the unquantized base instead: load it with `quantization: none` and
merge there (the adapter was trained against Q(W0), so that is a small, documented change too).

bitsandbytes >= 0.50 runs all of this on CPU. Its import logs a "Failed to load CPU
gemm_4bit_forward from kernels-community" warning (an optional kernel package), and its int8
matmul logs "inputs will be cast ... to float16" on every call; `quiet_bitsandbytes()` drops exactly
those two messages (importing flylora installs it).
"""
from __future__ import annotations

import logging

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")

# (logger, message prefix) of the known, harmless bitsandbytes messages we drop
_NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' two known noise messages (see module docstring); idempotent, imports nothing."""
    for name, prefix in _NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))


def check_quantization(quantization: str, compute_dtype: str | None = None, double_quant: bool = False,
                       where: str = "quantization") -> None:
    """One-line ValueError for a bad combination (prefix `where` names the setting)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"{where}: {quantization!r} is not allowed (allowed: {', '.join(QUANTIZATIONS)})")
    if quantization not in FOUR_BIT and (compute_dtype is not None or double_quant):
        raise ValueError(f"{where}: compute_dtype and double_quant apply to 4-bit bases (nf4, fp4) only, "
                         f"not to {quantization!r}")
    if quantization != "none":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{where}: {quantization!r} needs the bitsandbytes package "
                             "(pip install 'flylora[quant]' or pip install 'bitsandbytes>=0.50')")


def bnb_config(quantization: str, dtype, compute_dtype: str | None = None, double_quant: bool = False):
    """The transformers `BitsAndBytesConfig` for `quantization`, or None for "none".

    `dtype` is the storage dtype of everything not quantized; the 4-bit matmul runs in
    `compute_dtype` (default: `dtype`)."""
    check_quantization(quantization, compute_dtype, double_quant)
    if quantization == "none":
        return None
    quiet_bitsandbytes()
    from transformers import BitsAndBytesConfig

    from .models import parse_dtype

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=parse_dtype(compute_dtype or dtype), bnb_4bit_use_double_quant=double_quant,
    )


def is_quantized_linear(module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (without importing bitsandbytes when it is not loaded)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantized_kind(module) -> str | None:
    """"4-bit nf4", "4-bit fp4", "int8", or None for an unquantized layer."""
    if not is_quantized_linear(module):
        return None
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    state = getattr(module.weight, "quant_state", None)
    return f"4-bit {getattr(state, 'quant_type', None) or getattr(module.weight, 'quant_type', '?')}"


def merge_refusal(layer_key: str, kind: str) -> str:
    return (f"cannot merge into {layer_key!r}: its W0 is quantized ({kind}); requantizing W0 + ΔW would round the "
            f"update away and unmerge could not restore W0. Load the base with quantization none and merge there")


def prepare_for_training(model, gradient_checkpointing: bool, use_reentrant: bool):
    """PEFT's `prepare_model_for_kbit_training` for a quantized base (as the official finetune.py):
    freezes the base, casts the non-quantized fp16/bf16 parameters (embeddings, norms, lm_head) to
    fp32, and, when `gradient_checkpointing` (recipe.train.gradient_checkpointing), enables it with
    `use_reentrant` as the Trainer would, making the inputs require grad for the reentrant kind."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )
