"""SupCon with DistributedDataParallel on 2 CPU processes (gloo), checked against one process.

Each rank takes its half of every global batch, the encoder is wrapped in DDP, and the loss gets
``process_group``: it returns the loss of the global batch on every rank, and each rank's gradient is
``world_size x`` its share, so DDP's gradient averaging gives exactly the global gradient. To show it,
the same training then runs in one process on the whole batches, and the two models' parameters are
compared (float64, so the only difference is summation order).

    python examples/ddp_supcon.py                 # about 15 s on a 2-core CPU
    python examples/ddp_supcon.py --steps 5 --world 3

On GPUs use the "nccl" backend and one device per rank; the loss call is the same.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_contrastive as fc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_supcon_digits import Encoder, augment, load_digits_split  # noqa: E402


def batches(steps: int, batch_size: int, seed: int):
    """The global batches (two augmented views, labels): the same on every rank and in the check."""
    (x, y), _ = load_digits_split(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        yield torch.stack([augment(x[idx], gen), augment(x[idx], gen)], 1).double(), y[idx]


def train(steps, batch_size, seed, rank=0, world=1):
    """``world`` == 1: one process on the global batches; otherwise this rank's slice with DDP."""
    torch.manual_seed(seed)
    model = Encoder().double()
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    group = None if world == 1 else dist.group.WORLD
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    bounds = torch.linspace(0, batch_size, world + 1).round().long().tolist()  # this rank's rows
    losses = []
    for views, labels in batches(steps, batch_size, seed):
        lo, hi = bounds[rank], bounds[rank + 1]
        local = views[lo:hi]
        features = net(local.flatten(0, 1)).unflatten(0, (hi - lo, 2))  # [local bsz, 2 views, 32]
        loss = fc.supcon_loss(features, labels[lo:hi], temperature=0.1, process_group=group)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def worker(rank, world, init_file, steps, batch_size, seed, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, losses = train(steps, batch_size, seed, rank, world)
        if rank == 0:
            torch.save({"state": model.state_dict(), "losses": losses}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "init"), args.steps, args.batch_size, args.seed, out),
                 nprocs=args.world, join=True)
        ddp = torch.load(out)
    single, single_losses = train(args.steps, args.batch_size, args.seed)
    diff = max((ddp["state"][k] - v).abs().max().item() for k, v in single.state_dict().items())
    for step in range(0, args.steps, max(args.steps // 5, 1)):
        log(f"step {step + 1:3d}  loss {ddp['losses'][step]:.6f} ({args.world} ranks)  {single_losses[step]:.6f} (1 process)")
    log(f"largest parameter difference after {args.steps} steps, {args.world} ranks vs 1 process: {diff:.2e}")
    return {"ddp_losses": ddp["losses"], "single_losses": single_losses, "max_param_diff": diff}


if __name__ == "__main__":
    main()
