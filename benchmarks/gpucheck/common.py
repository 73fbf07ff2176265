"""Shared pieces of `benchmarks/gpu_check.py`: sizes, the device abstraction (timing with CUDA
events on a GPU, perf_counter on CPU; peak memory), the global time guard, model builders.

Everything the CUDA run does, the `--device cpu --tiny` run does on the same code paths with
tiny sizes, so the script cannot rot on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch


@dataclass(frozen=True)
class LlamaSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def describe(self) -> str:
        return (f"Llama h{self.hidden} i{self.intermediate} {self.layers} layers, "
                f"{self.heads} heads / {self.kv_heads} kv, vocab {self.vocab} (random init)")

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
            max_position_embeddings=4096, tie_word_embeddings=True, use_cache=False,
        )  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    parity_model: LlamaSize
    parity_batch: tuple[int, int]  # (batch, seq)
    train_model: LlamaSize
    train_batch: tuple[int, int]
    steps: int  # timed training steps per method
    warmup: int
    sync_steps: int  # steps run under sync detection
    prompt: int  # decode: prompt tokens (prefill, untimed)
    new_tokens: int  # decode: timed tokens
    decode_batches: tuple[int, ...] = (1, 16)


FULL = Sizes(
    # ~1.03 B parameters: 16 × (q,o 2·2048² + k,v 2·2048·512 + MLP 3·2048·8192) + 32000·2048 tied
    parity_model=LlamaSize(512, 1408, 2, 8, 4, 1024), parity_batch=(4, 128),
    train_model=LlamaSize(2048, 8192, 16, 32, 8, 32000), train_batch=(4, 1024),
    steps=20, warmup=3, sync_steps=1, prompt=128, new_tokens=32,
)
TINY = Sizes(
    parity_model=LlamaSize(64, 128, 2, 4, 2, 256), parity_batch=(2, 16),
    train_model=LlamaSize(64, 128, 2, 4, 2, 256), train_batch=(2, 32),
    steps=3, warmup=1, sync_steps=1, prompt=8, new_tokens=3,
)


class Budget:
    """The global time guard: sections and methods ask before they start, and are skipped with a
    note (never cut off halfway) when what is left is less than what they need."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()
        self.skipped: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append({"what": what, "reason": f"time guard: {self.left():.0f} s left of {self.seconds:.0f} s, "
                                                     f"needs ~{need_s:.0f} s"})
        return False


@dataclass
class Device:
    """The device under test. On CUDA, spans are timed with CUDA events (no host sync between
    steps: one synchronize when the times are read); on CPU with perf_counter."""

    type: str

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type)

    @property
    def cuda(self) -> bool:
        return self.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self, dtype: Optional[torch.dtype]):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.type, dtype=dtype)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> Optional[int]:
        return torch.cuda.memory_allocated() if self.cuda else None

    def peak(self) -> Optional[int]:
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def free(self) -> None:
        """Return a finished method's memory before the next is built (CUDA only: on CPU the
        allocator's peak is not measured, and gc.collect() costs ~0.5 s a call there)."""
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()

    def info(self) -> dict:
        if not self.cuda:
            return {"device": "cpu", "note": "no CUDA device: parity compares CPU against CPU"}
        p = torch.cuda.get_device_properties(0)
        return {
            "device": "cuda", "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }  # fmt: skip


@dataclass
class Timer:
    """Seconds of each `span()`; read them with `seconds()` once all spans are recorded."""

    device: Device
    _spans: list = field(default_factory=list)

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        if self.device.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
        else:
            a = time.perf_counter()
            yield
            b = time.perf_counter()
        self._spans.append((a, b))

    def seconds(self) -> list[float]:
        if self.device.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self._spans]
        return [b - a for a, b in self._spans]


def attempt(out: dict, what: str, fn: Callable[[], Any], device: Device, log) -> Any:
    """fn(), or None after recording its exception under out["errors"][what]: one failing method
    must not cost the section's other methods (a GPU session is short and may not come again)."""
    try:
        return fn()
    except Exception as e:
        out.setdefault("errors", {})[what] = {"error": f"{type(e).__name__}: {e}",
                                              "frames": traceback.format_exc().strip().splitlines()[-10:]}
        log(f"{what}: FAILED {type(e).__name__}: {e}")
        device.free()
        return None


def median(xs: list[float]) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def build_llama(size: LlamaSize, device: Device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Llama built directly on the device (no hub, no download), frozen."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with device.torch:
        model = LlamaForCausalLM(size.config())
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


def token_batch(vocab: int, batch: int, seq: int, device: Device, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same tokens on every device
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device.torch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def peft_copy(base: torch.nn.Module, method: str, seed: int):
    """The bench's method config on a weight-sharing copy of `base`, trainables randomised."""
    from peft import get_peft_model

    from flylora.bench import cases

    cfg = cases._method_configs()[method]
    if cfg is None:
        return cases._share_weights_copy(base)
    model = get_peft_model(cases._share_weights_copy(base), copy.deepcopy(cfg))
    cases._randomise_trainables(model, seed)
    return model
