"""Gather mode on 2 and 3 CPU processes (gloo) against the single-process loss of the global batch.

Every rank checks: the returned loss equals the global loss, its feature gradient equals
world_size x its slice of the global gradient, and the average of the ranks' temperature
gradients (what DDP computes) equals the global temperature gradient; float64, rel. error < 1e-9.
"""
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_contrastive as fc

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = {2: [5, 3], 3: [3, 1, 4]}  # uneven batches of the 8 samples


def global_problem():
    gen = torch.Generator().manual_seed(7)
    total = 8
    assert all(sum(split) == total for split in SPLITS.values())
    features = torch.nn.functional.normalize(torch.randn(total, 2, 6, dtype=torch.float64, generator=gen), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3, 9])  # uneven classes; class 1 and 3 only in one rank
    return features, labels


def assert_rel(actual, expected, what):
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err < 1e-9, f"{what}: relative error {float(err):.3g}"


def worker(rank, world, init_file, backends):
    sys.path.insert(0, HERE)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        features, labels = global_problem()
        sizes = SPLITS[world]
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        for backend in backends:
            for mode in ("all", "one"):
                for use_labels in (True, False):
                    for no_positive in ("zero", "exclude"):
                        y = labels if use_labels else None
                        kw = dict(contrast_mode=mode, no_positive=no_positive, base_temperature=0.1, backend=backend)
                        tau_ref = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
                        f_ref = features.clone().requires_grad_()
                        ref = fc.supcon_loss(f_ref, y, temperature=tau_ref, **{**kw, "backend": "reference"})
                        ref_grad_f, ref_grad_tau = torch.autograd.grad(ref, (f_ref, tau_ref))

                        tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
                        local = features[lo:hi].clone().requires_grad_()
                        local_labels = None if y is None else y[lo:hi]
                        loss = fc.supcon_loss(local, local_labels, temperature=tau, process_group=dist.group.WORLD, **kw)
                        grad_f, grad_tau = torch.autograd.grad(loss, (local, tau))
                        what = f"rank {rank}/{world} {backend} {mode} labels={use_labels} {no_positive}"
                        assert_rel(loss.detach(), ref.detach(), what + " loss")
                        assert_rel(grad_f, world * ref_grad_f[lo:hi], what + " features grad")
                        dist.all_reduce(grad_tau)
                        assert_rel(grad_tau / world, ref_grad_tau, what + " temperature grad (DDP average)")
        dist.barrier()  # gloo aborts a process whose peer tears down while it is still communicating
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gather_mode_is_exact(world):
    from helpers import CPU_BACKENDS

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), CPU_BACKENDS), nprocs=world, join=True)


def test_process_group_errors():
    features = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match="not initialised"):
        fc.supcon_loss(features, process_group=object())
