"""2-process gloo DDP run for tests/test_bias_cadence.py: FlyLoRA with bias_update_every="micro_batch",
2 micro-batches per optimizer step, and no update_routing_bias call in the loop. Each rank trains on
its half of every micro-batch; `single` is one process backwarding both halves of each micro-batch
together (one backward, so one update from the summed counts, as the all-reduce gives); the test
runs `single` in its own process. PEFT and flylora are imported in the ranks only, so the parent
stays light."""
import datetime
import os
import sys

import torch

torch.set_num_threads(1)
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

STEPS, ACCUMULATION = 2, 2


def micro_batches():
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(STEPS * ACCUMULATION):
        ids = torch.randint(0, 64, (4, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # padding on rank 0's half only: the all-reduce must carry real counts
        out.append((ids, mask))
    return out


def build():
    from peft import get_peft_model

    import flylora
    from conftest import make_model

    cfg = flylora.FlyLoraConfig(r=8, k=2, projection_seed=4, bias_update_rate=0.01, bias_update_every="micro_batch")
    return get_peft_model(make_model("llama"), cfg).train()


def loss_of(module, ids, mask):
    return module(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "flylora_B" in n or "flylora_bias" in n}


def worker(rank, world, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{out_dir}/rendezvous",
                            timeout=datetime.timedelta(seconds=120))
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    half = slice(2 * rank, 2 * rank + 2)
    for i, (ids, mask) in enumerate(micro_batches()):
        (loss_of(ddp, ids[half], mask[half]) / ACCUMULATION).backward()
        if (i + 1) % ACCUMULATION == 0:
            opt.step()
            opt.zero_grad()
    torch.save(snapshot(model), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def single():
    """One process, both halves of each micro-batch in one backward; returns the snapshot."""
    model = build()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for i, (ids, mask) in enumerate(micro_batches()):
        # DDP averages the two ranks' gradients
        loss = (loss_of(model, ids[:2], mask[:2]) + loss_of(model, ids[2:], mask[2:])) / 2
        (loss / ACCUMULATION).backward()
        if (i + 1) % ACCUMULATION == 0:
            opt.step()
            opt.zero_grad()
    return snapshot(model)


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1]), nprocs=2, join=True)
