"""Ring vs gather mode for every loss on 2 gloo ranks, CPU only (chunked backend, float32).

N global feature rows (views losses: N / 2 samples of 2 views, or N / 3 of 3; pair losses: N / 2 pairs; UniCon
also a universum row per view row), split evenly over the two processes, D = 128. Per repeat, gather and ring
run back to back (interleaved, so a burst of load from other processes hits both alike); a call's time is the
slower rank's fwd+bwd (barrier before, the maximum over ranks after). Medians over the repeats. This measures
CPU + gloo on one machine, where the "network" is a local socket and both ranks share the same cores: it says
what the ring's extra passes cost in compute, not what it saves in memory or how it overlaps transfers on GPUs.

    python bench/ring_overhead.py                       # N = 2048, 4096, 8192
    python bench/ring_overhead.py --sizes 2048 --losses clip,dcl --repeats 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def cases(n: int, dim: int, gen: torch.Generator):
    """name -> (loss(local tensors..., **kw), global per-sample tensors, shared tensors)."""
    import fused_contrastive as fc

    bsz = n // 2
    f = torch.nn.functional.normalize(torch.randn(bsz, 2, dim, generator=gen), dim=-1)
    y = torch.randint(0, 100, (bsz,), generator=gen)
    bank = torch.nn.functional.normalize(torch.randn(1024, dim, generator=gen), dim=-1)
    bank_y = torch.randint(0, 100, (1024,), generator=gen)
    centers = torch.nn.functional.normalize(torch.randn(100, dim, generator=gen), dim=-1)
    views, pair = (f, y), (f[:, 0].contiguous(), f[:, 1].contiguous())
    # three views from 2 N / 3 samples (the same N rows); a universum row per view row
    f3 = torch.nn.functional.normalize(torch.randn(n // 3, 3, dim, generator=gen), dim=-1)
    views3 = (f3, torch.randint(0, 100, (n // 3,), generator=gen))
    universum = torch.nn.functional.normalize(torch.randn(bsz, 2, dim, generator=gen), dim=-1)
    return {
        "supcon": (lambda a, b, **kw: fc.supcon_loss(a, b, temperature=0.1, **kw), views),
        "supcon_in": (lambda a, b, **kw: fc.supcon_loss(a, b, temperature=0.1, variant="in", **kw), views),
        "supcon_extra_keys": (lambda a, b, **kw: fc.supcon_loss(a, b, temperature=0.1, extra_keys=bank,
                                                                extra_key_labels=bank_y, **kw), views),
        "eps_supinfonce": (lambda a, b, **kw: fc.eps_supinfonce_loss(a, b, **kw), views),
        "dcl": (lambda a, **kw: fc.dcl_loss(a, **kw), views[:1]),
        "dclw": (lambda a, **kw: fc.dcl_loss(a, weighted=True, **kw), views[:1]),
        "info_nce": (lambda q, k, **kw: fc.info_nce(q, k, **kw), pair),
        "info_nce_queue": (lambda q, k, **kw: fc.info_nce(q, k, queue=bank, **kw), pair),
        "clip": (lambda i, t, **kw: fc.clip_loss(i, t, 14.3, **kw), pair),
        "debiased": (lambda a, **kw: fc.debiased_contrastive_loss(a, **kw), views[:1]),
        "hard_negatives": (lambda a, **kw: fc.debiased_contrastive_loss(a, beta=0.5, **kw), views[:1]),
        "bcl": (lambda a, b, **kw: fc.bcl_loss(a, b, class_centers=centers, **kw), views),
        "spread": (lambda a, b, **kw: fc.spread_loss(a, b, **kw), views),
        # ring mode through the common driver since these were refused (several specs, terms added to the rows,
        # a universum, PaCo's and TSC's row formulas)
        "spread_3views": (lambda a, b, **kw: fc.spread_loss(a, b, **kw), views3),
        "debiased_3views": (lambda a, **kw: fc.debiased_contrastive_loss(a, **kw), views3[:1]),
        "dclw_learned": (lambda a, **kw: fc.dcl_loss(a, weighted=True, detach_weight=False, **kw), views[:1]),
        "unicon": (lambda a, u, b, **kw: fc.unicon_loss(a, u, b, **kw), (f, universum, y)),
        "suncet": (lambda a, b, **kw: fc.suncet_loss(a, b, **kw), views),
        "eps_in": (lambda a, b, **kw: fc.eps_supinfonce_loss(a, b, form="in", **kw), views),
        "epsilon_supcon": (lambda a, b, **kw: fc.epsilon_supcon_loss(a, b, **kw), views),
        "paco": (lambda a, b, **kw: fc.paco_loss(a, b, centers, extra_keys=bank, extra_key_labels=bank_y,
                                                 normalize=True, **kw), views),
        "tsc": (lambda q, k, b, **kw: fc.tsc_loss(q, k, b, queue=bank, queue_labels=bank_y, targets=centers[:10],
                                                 target_labels=torch.arange(10), **kw), pair + (y,)),
    }


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def worker(rank, world, init_file, args, out_file):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    rows = []
    try:
        for n in args.sizes:
            table = cases(n, args.dim, torch.Generator().manual_seed(n))
            for name in args.losses:
                loss_fn, per_sample = table[name]
                b = per_sample[0].shape[0]
                lo, hi = rank * b // world, (rank + 1) * b // world
                times = {"gather": [], "ring": []}

                def step(mode):
                    local = [t[lo:hi].clone().requires_grad_(t.is_floating_point()) for t in per_sample]
                    loss = loss_fn(*local, backend="chunked", process_group=dist.group.WORLD, distributed=mode)
                    loss.backward()

                status = "ok"
                try:
                    for mode in ("gather", "ring"):  # warm-up
                        step(mode)
                    for _ in range(args.repeats):
                        for mode in ("gather", "ring"):
                            times[mode].append(timed(lambda: step(mode)))
                except Exception as err:  # recorded, the next case runs
                    status = f"{type(err).__name__}: {err}"[:200]
                row = {"loss": name, "n": n, "dim": args.dim, "world": world, "status": status}
                if status == "ok":
                    row.update({f"{m}_s": statistics.median(t) for m, t in times.items()})
                    row.update({f"{m}_all_s": t for m, t in times.items()})
                    row["ring_over_gather"] = row["ring_s"] / row["gather_s"]
                rows.append(row)
                if rank == 0:
                    print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all_s")}), flush=True)
        if rank == 0:
            with open(out_file, "w") as fh:
                json.dump(rows, fh)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,4096,8192")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--losses", default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "ring_overhead_cpu_gloo"))
    args = parser.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    all_losses = list(cases(8, 4, torch.Generator().manual_seed(0)))
    args.losses = all_losses if args.losses == "all" else args.losses.split(",")
    env = {"device": f"CPU ({os.cpu_count()} cores), 2 gloo processes on one machine", "torch": torch.__version__,
           "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "load_average": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        mp.spawn(worker, args=(2, os.path.join(tmp, "init"), args, out_file), nprocs=2, join=True)
        with open(out_file) as fh:
            rows = json.load(fh)
    env["load_average_end"] = load_average()
    with open(args.out + ".json", "w") as fh:
        json.dump({"environment": env, "dim": args.dim, "repeats": args.repeats, "rows": rows}, fh, indent=1)
    lines = [f"**CPU / gloo only** ({env['device']}) · torch {env['torch']} · commit {env['git_commit']} · "
             f"{env['date']} · load average {env['load_average']} at the start, {env['load_average_end']} at the end",
             "", f"fwd+bwd of each loss on the chunked backend, float32, D = {args.dim}, N global feature rows split "
             "evenly over 2 ranks; each time is the slower rank's, median of "
             f"{args.repeats} interleaved repeats. Both ranks share this machine's cores and talk over a local "
             "socket: this is the ring's extra compute (its passes over the shards, the backward's recomputed "
             "tiles), not what it saves in memory or how transfers overlap on a GPU cluster.", "",
             "| loss | N | gather | ring | ring / gather | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        def ms(key):
            return f"{1e3 * r[key]:.1f} ms" if key in r else "-"
        ratio = f"{r['ring_over_gather']:.2f}x" if "ring_over_gather" in r else "-"
        lines.append(f"| {r['loss']} | {r['n']} | {ms('gather_s')} | {ms('ring_s')} | {ratio} | {r['status']} |")
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
