"""Benchmark of the whole loss family, side by side in one run.

For every loss (``run.family_loss``) and backend: fwd+bwd time and peak memory beyond the
inputs at N feature rows (bsz = N / 2 samples, 2 views, D, dtype), each case in its own
subprocess (``run.py --case``). Ratios in the same run: each loss's memory against its own
``reference`` (the issue's CPU target: chunked <= 5% at N = 8192) and its time against SupCon's
on the same backend (the GPU target: within 1.5x of fused SupCon).

    python bench/family.py                 # N = 8192, D = 128, float32 on CPU; bf16 on a GPU
    python bench/family.py --sizes 4096 --losses dcl,clip
"""
from __future__ import annotations

import argparse
import json
import os

from run import HERE, ROOT, environment, fmt_bytes, fmt_noise, fmt_time, spawn_case
from timing import load_average

LOSSES = ["supcon", "supcon_in", "supcon_extra_keys", "supcon_memory_bank", "eps_supinfonce", "dcl", "dclw", "info_nce", "info_nce_queue",
          "clip", "debiased", "bcl", "spread", "symmetric_spread", "dclw_learned", "unicon", "suncet"]
# The distributed code path on one rank (gloo on CPU, NCCL on GPU): its overhead over plain SupCon.
DISTRIBUTED = ["supcon_gather_1rank", "supcon_ring_1rank"]


def markdown(rows, env, args):
    lines = [f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · "
             f"commit {env['git_commit']} · {env['date']} · load average {env.get('load_average')} at the start, "
             f"{env.get('load_average_end')} at the end", "",
             f"fwd+bwd of each loss at N = feature rows (bsz = N/2, 2 views), D = {args.dims}, {args.dtypes}; fwd and "
             "bwd timed separately in each repeat (bench/timing.py), medians over the repeats, `noise` half the "
             "20-80% quantile spread of fwd+bwd over its median; peak "
             "memory beyond the inputs; `memory vs reference`: this backend's peak over the reference backend's for "
             "the same loss; `time vs supcon`: this loss over SupCon (L_out) on the same backend (for the `_1rank` rows: "
             "the overhead of the distributed code path on one process).", "",
             "| loss | backend | N | D | dtype | fwd | bwd | fwd+bwd | min | noise | reps | peak extra memory | "
             "memory vs reference | time vs supcon | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['backend']} | {r['n']} | {r['dim']} | {r['dtype']} | "
                     f"{fmt_time(r.get('fwd_s'))} | {fmt_time(r.get('bwd_s'))} | {fmt_time(r.get('fwd_bwd_s'))} | "
                     f"{fmt_time(r.get('fwd_bwd_min_s'))} | {fmt_noise(r)} | {r.get('reps', '-')} | "
                     f"{fmt_bytes(r.get('peak_extra_bytes'))} | "
                     f"{r.get('memory_vs_reference', '-')} | {r.get('time_vs_supcon', '-')} | {r['status']} |")
    return "\n".join(lines) + "\n"


def add_ratios(rows):
    ok = {(r["loss"], r["backend"], r["n"], r["dim"], r["dtype"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        ref = ok.get((r["loss"], "reference", r["n"], r["dim"], r["dtype"]))
        if ref is not None and r["backend"] != "reference":
            r["memory_vs_reference"] = f"{r['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):.3f}x"
        sup = ok.get(("supcon", r["backend"], r["n"], r["dim"], r["dtype"]))
        if sup is not None and r["loss"] != "supcon":
            r["time_vs_supcon"] = f"{r['fwd_bwd_s'] / sup['fwd_bwd_s']:.2f}x"


def main():
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--losses", default=",".join(LOSSES + DISTRIBUTED))
    parser.add_argument("--backends", default=None, help="default: chunked,reference on CPU; triton,chunked on GPU")
    parser.add_argument("--sizes", default="8192")
    parser.add_argument("--dims", default="128")
    parser.add_argument("--dtypes", default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    backends = (args.backends or ("triton,chunked,reference" if gpu else "chunked,reference")).split(",")
    args.dtypes = args.dtypes or ("bfloat16" if gpu else "float32")
    env = environment(device)
    rows = []
    from tqdm import tqdm

    cases = [(loss, b, int(n), int(d), t) for n in args.sizes.split(",") for d in args.dims.split(",")
             for t in args.dtypes.split(",") for loss in args.losses.split(",") for b in backends]
    for loss, backend, n, dim, dtype in tqdm(cases, desc="family", unit="case"):
        row = {"loss": loss, "backend": backend, "n": n, "dim": dim, "dtype": dtype}
        row.update(spawn_case(f"{loss}:{backend}", n, dim, dtype, device, 20.0 if gpu else 15.0, 300.0))
        rows.append(row)
    add_ratios(rows)
    env["load_average_end"] = load_average()
    md = markdown(rows, env, args)
    print("\n" + md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag or f"family_{'gpu' if gpu else 'cpu'}_{env['date'][:10]}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print("wrote " + ", ".join(os.path.relpath(p, ROOT) for p in (stem + ".json", stem + ".md")))


if __name__ == "__main__":
    main()
