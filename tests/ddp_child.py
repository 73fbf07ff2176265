"""2-process gloo DDP run (spawned by test_flylora.py): each rank trains FlyLoRA on its half of a
batch; writes its B's and routing biases. With `single`, one process trains on the whole batch,
which DDP with gradient averaging and all-reduced counts must reproduce."""
import datetime
import faulthandler
import os
import sys

import torch

torch.set_num_threads(1)
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from peft import get_peft_model  # noqa: E402

import flylora  # noqa: E402
from conftest import make_model  # noqa: E402

STEPS = 3
# a rank stuck outside a collective (which the process-group timeout would catch) is turned into a
# failure with every thread's stack on stderr, instead of a silent wait for the test's timeout
HANG_S = 100
HANG_MARK = "Timeout (0:01:40)!"


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # some padding, so the all-reduce must carry real (not padded) counts
    mask[3, 4:] = 0
    return ids, mask


def build():
    model = get_peft_model(make_model("llama"), flylora.FlyLoraConfig(r=8, k=2, projection_seed=3, bias_update_rate=0.01))
    return model.train()


def train(model, ids, mask, module=None):
    module = module or model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        labels = ids.masked_fill(mask == 0, -100)
        module(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        flylora.update_routing_bias(model)


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "flylora_B" in n or "flylora_bias" in n}


def worker(rank, world, out_dir):
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    # file rendezvous: no TCP port to pick (a port freed by one test and taken by another's
    # torchrun left this run waiting); a timeout turns any other hang into a failure
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{out_dir}/rendezvous",
                            timeout=datetime.timedelta(seconds=120))
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids, mask = batch()
    half = slice(2 * rank, 2 * rank + 2)
    train(model, ids[half], mask[half], ddp)
    torch.save(snapshot(model), os.path.join(out_dir, f"rank{rank}.pt"))
    # the one hang this child showed (twice, in loaded full-suite runs) was after the work, as the
    # worker returned: DDP's reducer torn down after its process group. Tear down in order instead.
    del ddp
    dist.barrier()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "single":
        model = build()
        ids, mask = batch()
        # DDP averages the ranks' gradients, i.e. of (mean loss of half 0 + mean loss of half 1) / 2
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(STEPS):
            for half in (slice(0, 2), slice(2, 4)):
                labels = ids[half].masked_fill(mask[half] == 0, -100)
                (model(input_ids=ids[half], attention_mask=mask[half], labels=labels).loss / 2).backward()
            opt.step()
            opt.zero_grad()
            flylora.update_routing_bias(model)
        torch.save(snapshot(model), os.path.join(out_dir, "single.pt"))
    else:
        rendezvous = os.path.join(out_dir, "rendezvous")
        if os.path.exists(rendezvous):  # a retried run must not meet the first run's store
            os.remove(rendezvous)
        for leftover in ("rank0.pt", "rank1.pt"):
            if os.path.exists(os.path.join(out_dir, leftover)):
                os.remove(os.path.join(out_dir, leftover))
        mp.spawn(worker, args=(2, out_dir), nprocs=2, join=True)
