"""CLIP with gradient caching: a batch of 4096 pairs, with the towers' activations of 256 pairs at a time.

``fc.grad_cache_step`` runs both towers over the batch in micro-batches without grad, computes the fused
CLIP loss on the 4096 x 32 embeddings and its gradient with respect to them, then re-runs each micro-batch
with grad and backpropagates its slice of that gradient: the parameter gradients are those of one
full-batch step (dropout included: the random state is replayed per micro-batch), while memory holds one
micro-batch's activations plus the embeddings. First the example checks that claim in float64 on a smaller
batch, then it trains. (bench/grad_cache_memory.py measures the memory against batch size.)

    python examples/grad_cache_clip.py            # about a minute on a 2-core CPU
    python examples/grad_cache_clip.py --steps 5 --batch-size 16384
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn

import fused_contrastive as fc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_learnable_scale import paired_data, retrieval_top1  # noqa: E402


def tower(d_in: int, dim: int = 32, hidden: int = 512, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden),
                         nn.GELU(), nn.Linear(hidden, dim))


def clip_loss_fn(logit_scale):
    return lambda img, txt: fc.clip_loss(nn.functional.normalize(img, dim=-1), nn.functional.normalize(txt, dim=-1),
                                         logit_scale.exp())


def check_exact(batch_size: int = 256, micro: int = 64, seed: int = 0) -> float:
    """Largest relative difference between grad_cache_step's gradients and one full-batch step's (float64)."""
    images, texts = (t.double() for t in paired_data(batch_size, seed))
    torch.manual_seed(seed)
    towers = [tower(64).double(), tower(32).double()]
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
    params = [p for t in towers for p in t.parameters()] + [scale]
    torch.manual_seed(1)  # the full-batch step, drawing dropout masks micro-batch by micro-batch as the cache does
    embs = [torch.cat([t(x) for x in data.split(micro)]) for t, data in zip(towers, (images, texts))]
    clip_loss_fn(scale)(*embs).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.manual_seed(1)
    fc.grad_cache_step(towers, [images, texts], clip_loss_fn(scale), micro)
    return max(((p.grad - e).norm() / e.norm()).item() for p, e in zip(params, expected))


def train(steps: int = 15, batch_size: int = 4096, micro: int = 256, seed: int = 0, log=print) -> dict:
    err = check_exact(seed=seed)
    log(f"gradient caching vs one full-batch step (float64, dropout on): largest relative difference {err:.1e}")
    torch.manual_seed(seed)
    images, texts = paired_data(batch_size * 2, seed)
    test_images, test_texts = paired_data(512, seed + 1)
    towers = [tower(64), tower(32)]
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([p for t in towers for p in t.parameters()] + [scale], lr=1e-3, weight_decay=0.0)
    before = retrieval_top1(*[t.eval() for t in towers], test_images, test_texts)
    [t.train() for t in towers]
    start, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randperm(len(images))[:batch_size]
        opt.zero_grad()
        loss = fc.grad_cache_step(towers, [images[idx], texts[idx]], clip_loss_fn(scale), micro)
        opt.step()
        with torch.no_grad():
            scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        log(f"step {step + 1:3d}  loss {loss.item():.4f}  logit scale {scale.exp().item():6.2f}  "
            f"({time.perf_counter() - start:.1f} s)")
    after = retrieval_top1(*[t.eval() for t in towers], test_images, test_texts)
    log(f"held-out image->text top-1 among 512: {after:.3f} (untrained {before:.3f})")
    return {"exact_rel_diff": err, "losses": losses, "top1_before": before, "top1_after": after}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return train(args.steps, args.batch_size, args.micro_batch, args.seed)


if __name__ == "__main__":
    main()
