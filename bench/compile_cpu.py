"""torch.compile against eager for every loss of the family on CPU, and the forward without gradients.

For each loss (``run.family_loss``, N feature rows = 2 views of N/2 samples, D, float32, chunked backend):
fwd+bwd eagerly and compiled (``fullgraph=True``, the whole loss one custom op), and the forward alone under
``torch.no_grad()`` (eager and compiled), medians over the repeats after one warm-up (compilation), eager and
compiled calls interleaved so that load from other processes hits both alike.
Targets: compiled fwd+bwd within 5% of eager or faster; the no-grad forward <= 0.55x of fwd+bwd.

    python bench/compile_cpu.py                          # N = 4096, D = 128
    python bench/compile_cpu.py --sizes 4096,16384 --losses dcl,clip --reps 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

from run import HERE, NUM_CLASSES, environment, family_loss
from timing import load_average

LOSSES = ["supcon", "supcon_in", "supcon_extra_keys", "eps_supinfonce", "dcl", "dclw", "info_nce", "info_nce_queue",
          "clip", "debiased", "bcl", "spread"]


def timed_pair(first, second, reps):
    """(median, min) seconds of each of two callables after one warm-up call each (which compiles), the two
    interleaved call by call: on a shared machine a burst of load then hits both alike."""
    first(), second()
    samples = ([], [])
    for _ in range(reps):
        for fn, out in zip((first, second), samples):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [(statistics.median(xs), min(xs)) for xs in samples]


def measure(loss_name, n, dim, reps, compile_backend):
    import torch

    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(n // 2, 2, dim), dim=-1).requires_grad_()
    labels = torch.randint(0, NUM_CLASSES, (n // 2,))  # BCL has one center per class of these
    eager = family_loss(loss_name, "chunked")
    torch._dynamo.reset()
    compiled = torch.compile(eager, fullgraph=True, backend=compile_backend)

    def fwd_bwd(fn):
        def step():
            features.grad = None
            fn(features, labels).backward()
        return step

    def forward_only(fn):
        def step():
            with torch.no_grad():
                fn(features, labels)
        return step

    row = {"loss": loss_name, "n": n, "dim": dim}
    for what, step in (("fwd_bwd", fwd_bwd), ("no_grad_fwd", forward_only)):
        for label, (median, low) in zip(("eager", "compiled"), timed_pair(step(eager), step(compiled), reps)):
            row[f"{label}_{what}_s"], row[f"{label}_{what}_min_s"] = median, low
    row["compiled_vs_eager"] = row["compiled_fwd_bwd_s"] / row["eager_fwd_bwd_s"]
    for label in ("eager", "compiled"):
        row[f"{label}_no_grad_vs_fwd_bwd"] = row[f"{label}_no_grad_fwd_s"] / row[f"{label}_fwd_bwd_s"]
    return row


def markdown(rows, env, args):
    lines = [f"Device: {env['device']} · torch {env['torch']} · {env['date']} · load average {env['load_average']} "
             f"at the start, {env['load_average_end']} at the end (the machine is shared: timings are noisy)", "",
             f"Chunked backend, float32, D = {args.dim}, N feature rows (N/2 samples x 2 views); torch.compile("
             f"fullgraph=True, backend={args.compile_backend!r}); medians of {args.reps} repeats after one warm-up, eager "
             "and compiled calls interleaved. "
             "Targets: compiled fwd+bwd <= 1.05x eager; no-grad forward <= 0.55x fwd+bwd.", "",
             "| loss | N | eager fwd+bwd | compiled fwd+bwd | compiled / eager | eager no-grad fwd | "
             "compiled no-grad fwd | no-grad / fwd+bwd (eager) | no-grad / fwd+bwd (compiled) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['n']} | error: {r['error']} ||||||| ")
            continue
        lines.append(f"| {r['loss']} | {r['n']} | {r['eager_fwd_bwd_s']:.3f} s | {r['compiled_fwd_bwd_s']:.3f} s | "
                     f"{r['compiled_vs_eager']:.2f}x | {r['eager_no_grad_fwd_s']:.3f} s | "
                     f"{r['compiled_no_grad_fwd_s']:.3f} s | {r['eager_no_grad_vs_fwd_bwd']:.2f}x | "
                     f"{r['compiled_no_grad_vs_fwd_bwd']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4096")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default=None, help="result path without extension")
    args = parser.parse_args()
    env = environment("cpu")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for loss in args.losses.split(","):
            try:
                row = measure(loss, n, args.dim, args.reps, args.compile_backend)
            except Exception as err:  # one failing loss must not lose the others' numbers
                row = {"loss": loss, "n": n, "dim": args.dim, "error": f"{type(err).__name__}: {str(err)[:200]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, env, args)  # after every loss: a run cut short keeps what it measured


def write(rows, env, args):
    env["load_average_end"] = load_average()
    out = args.out or os.path.join(HERE, "results", f"compile_cpu_{datetime.date.today().isoformat()}")
    with open(out + ".json", "w") as fh:
        json.dump({"environment": env, "args": vars(args), "rows": rows}, fh, indent=1)
    with open(out + ".md", "w") as fh:
        fh.write(markdown(rows, env, args))


if __name__ == "__main__":
    main()
