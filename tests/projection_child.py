"""2-process gloo run of a *user's own* training script (spawned by test_projection.py): FlyLoRA
with projection_seed left unset, so every rank draws its own fresh seed. Four scenarios, one
process group: the adapter created before or after init_process_group, trained under DDP with
broadcast_buffers=False or under FSDP2 (`fully_shard`, CPU + gloo). Each rank writes, per
scenario, its seed, a digest of every A and its final B and routing bias d; the test checks the
ranks agree and match one process on the whole batch (`reference`, run by the test itself).
Usage: `projection_child.py dist OUT` or `projection_child.py load ADAPTER_DIR...`."""
import datetime
import hashlib
import os
import sys
import warnings

import torch

torch.set_num_threads(1)
# torch 2.13 deprecates broadcast_buffers; False (what `flylora train` uses) is the case under test
warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# flylora, peft and transformers are imported where used: the spawning parent never needs them

STEPS = 3
SCENARIOS = ("ddp_before_init", "ddp_after_init", "fsdp_before_init", "fsdp_after_init")


def build(**kw):
    import flylora
    from conftest import make_model
    from peft import get_peft_model

    config = flylora.FlyLoraConfig(r=8, k=2, bias_update_rate=0.01, **kw)  # seed unset: fresh per process
    return get_peft_model(make_model("llama"), config).train()


def update_bias(model):
    import flylora

    flylora.update_routing_bias(model)  # all-reduces the counts under a process group


def batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 64, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def step(module, ids, mask, scale=1.0):
    labels = ids.masked_fill(mask == 0, -100)
    (module(input_ids=ids, attention_mask=mask, labels=labels).loss * scale).backward()


def a_digest(model) -> str:
    """sha256 over every layer's A (in module order), as the rank holds it now."""
    h = hashlib.sha256()
    for name, buf in model.named_buffers():
        if ".flylora_A." in name:
            h.update(name.encode() + buf.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def snapshot(model) -> dict:
    """Full (gathered) B and d: FSDP2 shards B as a DTensor, so full_tensor() reassembles it."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "flylora_B" in name or "flylora_bias" in name:
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[name.replace("_fsdp_wrapped_module.", "")] = t.detach().clone()
    return out


def train_distributed(model, kind, ids, mask):
    if kind == "ddp":
        module = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        module = model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        step(module, ids, mask)
        opt.step()
        opt.zero_grad()
        update_bias(model)


def reference(seed: int) -> dict:
    """One process, the whole batch, rank 0's seed: DDP/FSDP average the two halves' gradients."""
    model = build(projection_seed=seed)
    ids, mask = batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        for half in (slice(0, 2), slice(2, 4)):
            step(model, ids[half], mask[half], scale=0.5)
        opt.step()
        opt.zero_grad()
        update_bias(model)
    return {"A": a_digest(model), "state": snapshot(model)}


def worker(rank, world, out_dir):
    # created before the process group exists: each rank has its own fresh seed until it is seen
    early = {s: build() for s in SCENARIOS if s.endswith("before_init")}
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{out_dir}/rendezvous",
                            timeout=datetime.timedelta(seconds=60))
    ids, mask = batch()
    half = slice(2 * rank, 2 * rank + 2)
    result = {}
    for s in SCENARIOS:
        model = early.get(s) or build()
        created = a_digest(model)
        train_distributed(model, s.split("_")[0], ids[half], mask[half])
        seed = model.peft_config["default"].projection_seed
        result[s] = {"seed": seed, "A_created": created, "A": a_digest(model), "state": snapshot(model)}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def load(paths: list[str]) -> None:
    """`load DIR...`: load each adapter folder; print OK, or the one-line error it raises, per line."""
    import flylora
    from conftest import make_model

    for path in paths:
        try:
            flylora.load_adapter(make_model("llama"), path)
            print("OK")
        except ValueError as e:
            print(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    if sys.argv[1] == "load":
        load(sys.argv[2:])
    else:
        mp.spawn(worker, args=(2, sys.argv[2]), nprocs=2, join=True)
