"""Peak memory of one CLIP training step against batch size: a plain step vs fc.grad_cache_step.

Each case runs in its own process. What is measured: the process's peak resident set size (Linux VmHWM,
reset through /proc/self/clear_refs just before the step) minus the resident size at that moment, i.e.
what one forward + backward adds on top of the model, its gradients and the batch's inputs (all allocated
by a warm-up step before the reset), with glibc told to map every block above 128 KB separately (see
MALLOC_ENV) so that freed tensors leave the RSS. Small allocations and torch's scratch give a floor of a
few MB. The towers are two 3-layer MLPs (hidden 1024) whose
activations (about 7 floats x hidden per pair) dwarf the 2 x 128-float embeddings; the loss is the fused
CLIP loss (chunked backend: O(N) beyond its inputs).

    python bench/grad_cache_memory.py       # 12 processes, about 2 minutes of CPU time (16 min wall when loaded)
    python bench/grad_cache_memory.py --sizes 512 2048 --out /tmp/gc

Writes OUT.md, OUT.json and OUT.png (default bench/results/grad_cache_memory_cpu).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

HIDDEN, DIM, D_IN = 1024, 128, 256
# glibc serves blocks above a threshold with mmap and returns them on free, but by default it raises that
# threshold after the first large free, and then keeps freed tensors in its heap: the warm-up step's buffers
# would be reused without raising the RSS, hiding part of the measured step. A fixed threshold (which also
# switches off the adjustment) makes every tensor above 128 KB an mmap that RSS sees come and go.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_case(mode: str, batch: int, micro: int) -> dict:
    import torch
    from torch import nn

    import fused_contrastive as fc

    torch.manual_seed(0)
    torch.set_num_threads(1)  # one thread: scratch memory independent of the machine's core count

    def tower():
        return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                             nn.Linear(HIDDEN, DIM))

    towers = [tower(), tower()]
    scale = nn.Parameter(torch.tensor(2.6))
    images, texts = torch.randn(batch, D_IN), torch.randn(batch, D_IN)

    def loss_fn(img, txt):
        return fc.clip_loss(nn.functional.normalize(img, dim=-1), nn.functional.normalize(txt, dim=-1), scale.exp(),
                            backend="chunked")

    def step():
        if mode == "plain":
            loss = loss_fn(towers[0](images), towers[1](texts))
            loss.backward()
        else:
            loss = fc.grad_cache_step(towers, [images, texts], loss_fn, micro)
        return float(loss)

    step()  # warm-up: gradients allocated, lazy initialisation done
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    loss = step()
    return {"mode": mode, "batch": batch, "micro": micro, "loss": loss,
            "peak_extra_bytes": max(_status_bytes("VmHWM") - base, 0)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--micro", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "grad_cache_memory_cpu"))
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), int(args.case[2]))))
        return
    rows = []
    for batch in args.sizes:
        for mode in ("plain", "grad_cache"):
            proc = subprocess.run([sys.executable, __file__, "--case", mode, str(batch), str(args.micro)],
                                  capture_output=True, text=True, check=True, env={**os.environ, **MALLOC_ENV})
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["embeddings_bytes"] = 2 * 2 * batch * DIM * 4  # both towers' embeddings and their gradients
            rows.append(row)
            print(f"{mode:10s} N = {batch:6d}: {row['peak_extra_bytes'] / 2**20:8.1f} MB (loss {row['loss']:.4f})",
                  flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "hidden": HIDDEN, "dim": DIM, "d_in": D_IN, "micro": args.micro,
                   "machine": platform.machine(), "cpus": os.cpu_count()}, f, indent=1)
    by = {(r["mode"], r["batch"]): r for r in rows}
    mb = lambda b: f"{b / 2**20:.1f} MB"
    lines = [f"# Peak memory of one CLIP step, plain vs `grad_cache_step` (micro-batch {args.micro})", "",
             f"CPU ({platform.machine()}, {os.cpu_count()} cores, 1 thread), fp32, towers: 3-layer MLPs "
             f"{D_IN} -> {HIDDEN} -> {HIDDEN} -> {DIM}; loss: fused CLIP (chunked). Measured: peak RSS (VmHWM) "
             "during one forward + backward minus RSS before it (model, gradients and inputs already "
             "allocated; glibc with a fixed 128 KB mmap threshold, so freed tensors leave the RSS). "
             "Reproduce: `python bench/grad_cache_memory.py`.", "",
             "| N (pairs) | plain step | grad_cache_step | embeddings + their gradients |", "|---|---|---|---|"]
    for batch in args.sizes:
        lines.append(f"| {batch} | {mb(by['plain', batch]['peak_extra_bytes'])} | "
                     f"{mb(by['grad_cache', batch]['peak_extra_bytes'])} | "
                     f"{mb(by['plain', batch]['embeddings_bytes'])} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, label in (("plain", "plain step"), ("grad_cache", f"grad_cache_step (micro-batch {args.micro})")):
        ax.plot(args.sizes, [by[mode, b]["peak_extra_bytes"] / 2**20 for b in args.sizes], "o-", label=label)
    ax.plot(args.sizes, [by["plain", b]["embeddings_bytes"] / 2**20 for b in args.sizes], "k--",
            label="embeddings + gradients (2 x 2 x N x 128 fp32)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size N (pairs)")
    ax.set_ylabel("peak memory of one step beyond inputs (MB)")
    ax.set_title("CLIP step on CPU: peak RSS vs batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print("wrote", args.out + ".md", args.out + ".json", args.out + ".png")


if __name__ == "__main__":
    main()
