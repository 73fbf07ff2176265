"""The frozen projection A is the same wherever a FlyLoRA / LoRA-FA adapter runs.

A is not stored by default: each layer regenerates it as
    A = densify(sparse_projection(r, n, p, layer_seed(projection_seed, layer_key)))
so three things must hold for an adapter to mean one function everywhere:

1. **Distributed ranks agree on the seed.** A seed left unset is drawn from fresh entropy, i.e.
   differently on every rank. When torch.distributed is initialised at creation, rank 0's seed
   is broadcast before any layer is built; when the adapter was created before
   `init_process_group`, the first training forward under a process group broadcasts it and the
   other ranks rebuild A in place (whatever wraps the model: DDP with broadcast_buffers=False,
   FSDP, DeepSpeed all run training forwards on every rank). Explicit seeds are not communicated
   (every rank passes the same int), so loading or building an adapter on one rank never blocks.
2. **The seed travels with the state dict.** Each layer keeps it as a persistent int64 buffer
   `flylora_seed` (1,), so `set_peft_model_state_dict`, `inject_adapter_in_model` + `load_state_dict`
   and FSDP checkpoints carry it; a layer that loads another seed adopts it and rebuilds A (files
   without the key, written before it existed, keep the config's seed).
3. **A regenerated elsewhere is the A that was trained.** torch's CPU `randn` is not bit-stable:
   measured on torch 2.13, the same generator state gives different last bits on CPUs running
   the AVX2/AVX512 kernels than on the DEFAULT one (aarch64, or ATEN_CPU_CAPABILITY=default), and
   a torch release may change it outright. `save_pretrained` writes a sha256 of every layer's
   sparse form (`projection_fingerprint`); a config carrying one is checked when A is
   regenerated, and a mismatch is one line telling to re-save with `save_projection=True` (the
   file then holds A itself, and the check is skipped).
"""
from __future__ import annotations

import hashlib
import re
import secrets
from typing import Iterable, Optional

import torch
from peft.tuners._buffer_dict import BufferDict

from ..loading import AdapterLoadError

FRESH = "_fresh_projection_seed"  # set on a config whose seed was drawn here, not given
OWN_FINGERPRINT = "_projection_fingerprint_is_own"  # set when save_pretrained wrote it in this process
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_INT64 = (-(2**63), 2**63)


class ProjectionMismatchError(AdapterLoadError):
    """A regenerated from the seed is not the A the adapter was saved with."""


# ------------------------------------------------------------------------------------ config
def resolve_projection_seed(config) -> None:
    """Validate `projection_seed` and `projection_fingerprint`; draw a fresh seed when unset."""
    seed = config.projection_seed
    if seed is None:
        # fresh entropy, not torch's RNG: with set_seed(23) before every task, the official code
        # gives every task adapter the same A, which voids the merge-orthogonality argument
        config.projection_seed = secrets.randbits(62)
        setattr(config, FRESH, True)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not _INT64[0] <= seed < _INT64[1]:
        raise ValueError(f"projection_seed={seed!r} is not allowed: it must be an int in [-2**63, 2**63)")
    fp = getattr(config, "projection_fingerprint", None)
    if fp is not None and not (isinstance(fp, str) and _FINGERPRINT.fullmatch(fp)):
        raise ValueError(f"projection_fingerprint={fp!r} is not allowed: it must be 'sha256:' + 64 hex digits")


# ------------------------------------------------------------------------------------ digests
def sparse_digest(layer_key: str, cols: torch.Tensor, vals: torch.Tensor, n: int) -> Optional[str]:
    """sha256 of one layer's A in sparse form: its name, shape, int32 columns and fp32 values
    (None on the meta device, where A has no values)."""
    if cols.is_meta or vals.is_meta:
        return None
    h = hashlib.sha256(f"{layer_key}|{tuple(cols.shape)}|{n}|".encode())
    h.update(cols.detach().to("cpu", torch.int32).contiguous().numpy().tobytes())
    h.update(vals.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def adapter_fingerprint(layers: Iterable, name: str) -> Optional[str]:
    """One digest per adapter: sha256 over its layers' digests in layer-name order."""
    digests = sorted((layer.layer_key, layer.projection_digest(name)) for layer in layers)
    if not digests or any(d is None for _, d in digests):
        return None
    h = hashlib.sha256()
    for key, d in digests:
        h.update(f"{key}={d}\n".encode())
    return "sha256:" + h.hexdigest()


def mismatch_text(name: str, seed: int, want: str, got: str) -> str:
    return (
        f"adapter {name!r}: the frozen projection A regenerated from projection_seed={seed} has fingerprint "
        f"{got[:19]}… but its config says {want[:19]}…: the config was edited, or this torch "
        f"({torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}) draws other random numbers "
        f"than the one that saved it; re-save the adapter with save_projection=True on the original machine "
        f"(the file then holds A itself)"
    )


# ------------------------------------------------------------------------------------ distributed
def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_rank0(values: list[int]) -> list[int]:
    """Rank 0's ints on every rank of the default process group (one int64 broadcast)."""
    import torch.distributed as dist

    device = torch.device("cpu")
    if "gloo" not in str(dist.get_backend()).lower() and torch.accelerator.is_available():
        acc = torch.accelerator.current_accelerator()
        device = torch.device(acc.type, torch.accelerator.current_device_index())
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return [int(v) for v in t.cpu().tolist()]


# ------------------------------------------------------------------------------------ containers
class Fp32BufferDict(BufferDict):
    """A BufferDict whose float buffers stay fp32 through `model.half()` / `.to(bfloat16)`: the
    routing bias d (in fp16 a 1e-3 step is lost once |d| ≥ 4) and A's sparse values (kept exact so
    a saved A reloads bit-identically). Device moves apply as usual."""

    def _apply(self, fn, recurse=True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for key, buf in self._buffers.items():
            old = before.get(key)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32 and old is not None:
                # the cast would round: keep the fp32 values, on the device fn chose
                self._buffers[key] = old.float().to(buf.device)
        return self


class SeedDict(BufferDict):
    """The per-adapter seed buffers (int64, shape (1,)). A loader that assigns one with setattr
    (load_state_dict(assign=True), transformers' native adapter loading) makes the layer adopt it;
    the layer is a plain attribute (not a submodule), so deepcopy maps it to the copy."""

    def __init__(self, layer):
        super().__init__(persistent=True)
        object.__setattr__(self, "_layer", layer)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        layer = self.__dict__.get("_layer")
        if layer is not None and name in self._buffers and torch.is_tensor(value) and not value.is_meta:
            layer.seed_assigned(name, int(value.reshape(-1)[0]))


# ------------------------------------------------------------------------------------ layer side
class ProjectionLayerMixin:
    """A tuner layer's A: built from a seed, rebuilt in place when another seed is adopted.

    Per adapter: `flylora_seed` (persistent int64 (1,)), `a_seed` (the int A was built from),
    `a_nnz` (p), `a_digest` (sha256 of the generated sparse form). The containers flylora_A,
    flylora_A_cols, flylora_A_vals, r and layer_key come from the layer class."""

    def _create_projection_containers(self) -> None:
        self.flylora_seed = SeedDict(self)
        self.a_seed: dict[str, int] = {}
        self.a_nnz: dict[str, int] = {}
        self.a_digest: dict[str, str] = {}
        self._incoming_seeds: Optional[tuple[str, dict]] = None  # set while load_state_dict runs
        self.register_load_state_dict_post_hook(_adopt_loaded_seeds)

    def build_projection(self, name: str, seed: int, r: int, p: int, keep_sparse: bool) -> None:
        """A = densify(sparse_projection(r, n, p, layer_seed(seed, layer_key))), written in place
        into existing buffers (wrappers such as DDP/FSDP keep references to them)."""
        from ..layers.flylora import densify, layer_seed, sparse_projection

        n = self.in_features
        cols, vals = sparse_projection(r, n, p, layer_seed(seed, self.layer_key))  # (r, p) each
        self.a_seed[name], self.a_nnz[name] = int(seed), p
        self.a_digest[name] = sparse_digest(self.layer_key, cols, vals, n)
        new = {"flylora_A": densify(cols, vals, n), "flylora_seed": torch.tensor([int(seed)], dtype=torch.int64)}
        if keep_sparse:
            new.update(flylora_A_cols=cols, flylora_A_vals=vals)
        for attr, t in new.items():
            store = getattr(self, attr)
            old = store[name] if name in store else None
            if old is not None and old.shape == t.shape and not old.is_meta:
                with torch.no_grad():
                    old.copy_(t)  # same device and dtype as before
            else:
                store[name] = t if old is None or old.is_meta else t.to(old.device)

    def projection_digest(self, name: str) -> Optional[str]:
        """sha256 of this layer's A for adapter `name`: of the stored sparse form when it is kept
        (save_projection, or loaded from a file), else of the one generated from the seed."""
        if name in self.flylora_A_cols and name in self.flylora_A_vals:
            return sparse_digest(self.layer_key, self.flylora_A_cols[name], self.flylora_A_vals[name], self.in_features)
        return self.a_digest[name]

    def adopt_projection_seed(self, name: str, seed: int) -> bool:
        """Make A the one of `seed`; True if it had to be rebuilt."""
        if name not in self.a_seed or self.a_seed[name] == seed:
            return False
        self.build_projection(name, seed, self.r[name], self.a_nnz[name], keep_sparse=name in self.flylora_A_cols)
        return True

    def seed_assigned(self, name: str, seed: int) -> None:
        """A loader set the seed buffer with setattr. Inside load_state_dict the post-hook decides
        (it sees every key); otherwise (transformers' native loading) a sparse form the layer keeps
        is the file's own A, assigned next to the seed, and any other A is rebuilt from the seed."""
        if self._incoming_seeds is not None or name not in self.a_seed:
            return
        if name in self.flylora_A_cols:
            self.a_seed[name] = seed
        else:
            self.adopt_projection_seed(name, seed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # children (the BufferDicts) load after this, the post-hook after them: note what comes in
        incoming = {}
        for name in self.a_seed:
            t = state_dict.get(f"{prefix}flylora_seed.{name}")
            if torch.is_tensor(t) and t.numel() == 1 and not t.is_meta:
                sparse = all(f"{prefix}flylora_A_{part}.{name}" in state_dict for part in ("cols", "vals"))
                incoming[name] = (int(t.reshape(-1)[0]), sparse)
        self._incoming_seeds = (prefix, incoming)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _adopt_loaded_seeds(layer: ProjectionLayerMixin, incompatible_keys) -> None:
    """After load_state_dict: a layer that got another seed rebuilds A from it, unless the file
    also held A's sparse form and the layer keeps it (that A wins). Adapter files written before
    the seed was saved have no `flylora_seed`: not a missing key, the config's seed stays."""
    state, layer._incoming_seeds = layer._incoming_seeds, None
    if state is None:
        return
    prefix, incoming = state
    for name in layer.a_seed:
        key = f"{prefix}flylora_seed.{name}"
        if key in incompatible_keys.missing_keys:
            incompatible_keys.missing_keys.remove(key)
    for name, (seed, sparse_in_file) in incoming.items():
        if sparse_in_file and name in layer.flylora_A_cols:
            layer.a_seed[name] = seed
        else:
            layer.adopt_projection_seed(name, seed)


# ------------------------------------------------------------------------------------ tuner side
class ProjectionTunerMixin:
    """Seed agreement across ranks, the fingerprint check on creation, and both written on save."""

    def _pre_injection_hook(self, model, config, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        if getattr(config, FRESH, False) and world_size() > 1:
            # every rank creates the adapter (a training script): all take rank 0's fresh seed
            config.projection_seed = broadcast_from_rank0([config.projection_seed])[0]
            setattr(config, FRESH, False)

    def _projection_injected(self, config, adapter_name: str) -> None:
        """Called by the tuner's _post_injection_hook, once the layers exist."""
        if getattr(config, FRESH, False):
            # created before init_process_group (if ever): agree at the first training forward
            self._pending_seed_sync = getattr(self, "_pending_seed_sync", set()) | {adapter_name}
        want = getattr(config, "projection_fingerprint", None)
        if want is None or config.save_projection or getattr(config, OWN_FINGERPRINT, False):
            return  # nothing to check, or the file holds A itself, or we wrote it for another model
        got = adapter_fingerprint(_layers_of(self.model, adapter_name), adapter_name)
        if got is not None and got != want:
            raise ProjectionMismatchError(mismatch_text(adapter_name, config.projection_seed, want, got))

    def _sync_pending_seeds(self) -> None:
        """First training forward under a process group: adapters created with a fresh seed before
        it existed take rank 0's seed (one broadcast for all of them), rebuilding A in place."""
        pending = getattr(self, "_pending_seed_sync", None)
        if not pending or world_size() <= 1:
            return
        names = sorted(n for n in pending if n in self.peft_config)
        layers = {n: _layers_of(self.model, n) for n in names}
        mine = [layers[n][0].a_seed[n] if layers[n] else self.peft_config[n].projection_seed for n in names]
        for n, seed in zip(names, broadcast_from_rank0(mine) if names else []):
            for layer in layers[n]:
                layer.adopt_projection_seed(n, seed)
            self.peft_config[n].projection_seed = seed
            setattr(self.peft_config[n], FRESH, False)
        pending.clear()

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # the config saved next to these tensors names the seed A was built from and its fingerprint
        layers = _layers_of(model, adapter_name)
        if layers:
            seeds = {layer.a_seed[adapter_name] for layer in layers}
            if len(seeds) == 1:
                config.projection_seed = seeds.pop()
            fp = adapter_fingerprint(layers, adapter_name)
            if fp is not None and hasattr(config, "projection_fingerprint"):
                config.projection_fingerprint = fp
                setattr(config, OWN_FINGERPRINT, True)
        return super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )  # fmt: skip


def _layers_of(model, adapter_name: str) -> list:
    return [m for m in model.modules() if isinstance(m, ProjectionLayerMixin) and adapter_name in m.a_seed]
