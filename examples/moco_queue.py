"""MoCo v2 on scikit-learn's digits: a momentum key encoder and a queue of past keys (``fc.MemoryBankLoss``).

The query encoder is trained with InfoNCE against its momentum copy's key of the other augmented view
(the positive) and the queue's keys (the negatives, ``in_batch_negatives=False`` as in MoCo); after each
step the batch's keys are enqueued and the oldest ones leave. No labels are used; a 5-NN probe on a
held-out split is compared with the same encoder untrained (on digits a random convolutional encoder
already reaches about 0.96, so the probe mainly shows that nothing collapsed; the loss curve shows the
learning).

    python examples/moco_queue.py                 # about 10 s on a 2-core CPU
    python examples/moco_queue.py --epochs 3 --queue 512
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import fused_contrastive as fc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_supcon_digits import Encoder, augment, knn_accuracy, load_digits_split  # noqa: E402


def train(epochs: int = 40, batch_size: int = 128, queue: int = 1024, momentum: float = 0.99,
          temperature: float = 0.1, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    train_set, test_set = load_digits_split(seed)
    query_encoder = Encoder()
    key_encoder = copy.deepcopy(query_encoder).requires_grad_(False)
    untrained = knn_accuracy(query_encoder, train_set, test_set)
    criterion = fc.MemoryBankLoss(fc.info_nce, queue, 32, temperature=temperature, in_batch_negatives=False)
    opt = torch.optim.SGD(query_encoder.parameters(), lr=0.06, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    start, losses = time.perf_counter(), []
    for epoch in range(epochs):
        order, total = torch.randperm(len(train_set[1]), generator=gen), 0.0
        for i in range(0, len(order) - batch_size + 1, batch_size):
            x = train_set[0][order[i:i + batch_size]]
            query = query_encoder(augment(x, gen))
            with torch.no_grad():
                key = key_encoder(augment(x, gen))
            loss = criterion(query, key)  # the queue's keys are the negatives; then `key` is enqueued
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # the key encoder follows the query encoder slowly
                for k, q in zip(key_encoder.parameters(), query_encoder.parameters()):
                    k.mul_(momentum).add_(q, alpha=1 - momentum)
            total += loss.item()
        losses.append(total / (len(order) // batch_size))
        if (epoch + 1) % max(epochs // 5, 1) == 0:
            log(f"epoch {epoch + 1:3d}  loss {losses[-1]:.4f}  queue {len(criterion.bank)} keys")
    trained = knn_accuracy(query_encoder, train_set, test_set)
    log(f"5-NN accuracy on held-out digits {trained:.3f} (untrained {untrained:.3f}), "
        f"{time.perf_counter() - start:.1f} s")
    return {"losses": losses, "untrained_knn_acc": untrained, "trained_knn_acc": trained}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--queue", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return train(args.epochs, args.batch_size, args.queue, seed=args.seed)


if __name__ == "__main__":
    main()
