"""SigLIP fwd+bwd: fused_contrastive.siglip_loss against open_clip's SigLipLoss in the same run.

Providers, each case (provider, N, D, dtype) in its own subprocess so that its peak memory is its own (peak RSS
beyond the inputs on CPU, torch.cuda.max_memory_allocated on a GPU; bench/run.py's method and bench/timing.py's
fwd/bwd timing):

* ``fused``: ``fc.siglip_loss`` with backend auto (chunked on CPU, triton on a GPU), learnable scale and bias.
* ``open_clip``: open_clip's ``SigLipLoss`` (its own loss.py, loaded by file path: tests/helpers.py).
* ``open_clip_chunked``: open_clip 3.3.0's SigLipLoss has no ``chunk_size`` option; this is its formula applied
  to blocks of 1024 image rows under autograd, what such an option does (the forward never holds the whole
  logits at once, autograd still saves every block's logits and sigmoid inputs: quadratic memory).

N = images = texts. Ratios against ``open_clip`` at the same N. A case whose memory, extrapolated from the
provider's previous N (x4 per doubling), exceeds 80% of the available memory is skipped, as is a provider after
its first failure.

    python bench/siglip.py                          # CPU, N = 4096 .. 32768 and 65536 (fused), D = 512, float32
    python bench/siglip.py --sizes 4096,8192 --providers fused,open_clip
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from run import available_memory_bytes, environment, fmt_bytes, fmt_noise, fmt_time, measure_case  # noqa: E402
import timing  # noqa: E402

PROVIDERS = ("fused", "open_clip", "open_clip_chunked")
CHUNK_ROWS = 1024


def make_provider(name):
    import torch

    if name == "fused":
        import fused_contrastive as fc

        return lambda x, y, s, b: fc.siglip_loss(x, y, s, b)
    from helpers import open_clip_loss_module

    oc = open_clip_loss_module()
    if oc is None:
        raise RuntimeError("open_clip's loss.py is not available")
    loss = oc.SigLipLoss()
    if name == "open_clip":
        return lambda x, y, s, b: loss(x, y, s, b)

    def chunked(x, y, s, b):  # its _loss, one block of image rows at a time, each against all texts
        total = 0.0
        for start in range(0, x.shape[0], CHUNK_ROWS):
            xb = x[start:start + CHUNK_ROWS]
            logits = loss.get_logits(xb, y, s, b)
            labels = -torch.ones_like(logits)
            idx = torch.arange(xb.shape[0], device=x.device)
            labels[idx, idx + start] = 1.0
            total = total - torch.nn.functional.logsigmoid(labels * logits).sum()
        return total / x.shape[0]

    return chunked


def run_case(provider, n, dim, dtype_name, device, budget_s, threads):
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    x0, y0 = torch.nn.functional.normalize(torch.randn(2, n, dim, generator=gen), dim=-1).to(device=device, dtype=dtype)
    fn = make_provider(provider)

    def step():
        x, y = x0.detach().requires_grad_(), y0.detach().requires_grad_()
        s = torch.tensor(10.0, device=device, requires_grad=True)
        b = torch.tensor(-10.0, device=device, requires_grad=True)
        return fn(x, y, s, b), (x, y, s, b)

    def warm_up():  # imports and first-call setup on a tiny batch, so that the peak is the loss's own
        tiny = [t[:8].detach().requires_grad_() for t in (x0, y0)]
        fn(*tiny, torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0)).backward()

    cuda = device.startswith("cuda")
    result = measure_case(step, cuda=cuda, budget_s=budget_s, max_reps=30 if cuda else 3, warm_up=warm_up)
    return {k: result[k] for k in ("fwd_s", "bwd_s", "fwd_bwd_s", "fwd_bwd_min_s", "noise", "reps", "loss_value",
                                   "peak_extra_bytes")}


def spawn_case(provider, n, dim, dtype, device, budget_s, timeout_s, threads):
    cmd = [sys.executable, __file__, "--case", provider, str(n), str(dim), dtype, device, str(budget_s), str(threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"over the {timeout_s:.0f} s time limit"}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()
        oom = "out of memory" in out.stderr.lower() or out.returncode == -9
        return {"status": "out of memory" if oom else f"failed: {(tail[-1] if tail else out.returncode)!s:.200}"}
    return {"status": "ok", **json.loads(out.stdout.strip().splitlines()[-1])}


def markdown(rows, env, args):
    lines = [f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · commit {env['git_commit']} · "
             f"{env['date']} · load average {env.get('load_average')} at the start, {env.get('load_average_end')} at "
             "the end", "",
             f"SigLIP fwd+bwd, N images x N texts, D = {args.dim}, {args.dtype}, learnable scale and bias, "
             f"{args.threads or 'default'} CPU thread(s) per case (on a GPU: n/a); medians over "
             "the repeats (bench/timing.py), `noise` half the 20-80% band over the median; peak memory beyond the "
             "inputs; ratios against open_clip's SigLipLoss at the same N. `fused` is fc.siglip_loss (backend auto: "
             "chunked on CPU, triton on a GPU); `open_clip_chunked` is open_clip's formula over blocks of "
             f"{CHUNK_ROWS} image rows (3.3.0 has no chunk_size option).", "",
             "| provider | N | fwd | bwd | fwd+bwd | min | noise | reps | peak extra memory | time vs open_clip | "
             "memory vs open_clip | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['n']} | {fmt_time(r.get('fwd_s'))} | {fmt_time(r.get('bwd_s'))} | "
                     f"{fmt_time(r.get('fwd_bwd_s'))} | {fmt_time(r.get('fwd_bwd_min_s'))} | {fmt_noise(r)} | "
                     f"{r.get('reps', '-')} | {fmt_bytes(r.get('peak_extra_bytes'))} | {r.get('time_ratio', '-')} | "
                     f"{r.get('memory_ratio', '-')} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per case (default 1: on a shared, loaded machine every multi-threaded op "
                             "waits for its sibling thread to be scheduled, which punishes many small ops; 0: torch's "
                             "default)")
    parser.add_argument("--sizes", default="4096,8192,16384,32768,65536")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on a GPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of repeats per case (at least 3)")
    parser.add_argument("--baseline-max-n", type=int, default=None,
                        help="largest N for the open_clip providers (default: 16384 on CPU, where their N x N fp32 "
                             "matrices, 5 GB at N = 16384 and 4x per doubling, would not fit beside the other work of "
                             "a shared machine; none on a GPU)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default=None, help="result prefix (default bench/results/siglip_<device>_<date>)")
    args = parser.parse_args()
    if args.case:
        provider, n, dim, dtype, device, budget, threads = args.case
        print(json.dumps(run_case(provider, int(n), int(dim), dtype, device, float(budget), int(threads))))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    env = environment(device)
    limit = 0.8 * available_memory_bytes(device)
    rows, stopped, last = [], set(), {}
    for n in [int(s) for s in args.sizes.split(",")]:
        for provider in args.providers.split(","):
            row = {"provider": provider, "n": n, "dim": args.dim, "dtype": args.dtype}
            baseline_max = args.baseline_max_n or (16384 if device == "cpu" else None)
            if provider.startswith("open_clip") and baseline_max and n > baseline_max:
                row["status"] = f"skipped (N > --baseline-max-n {baseline_max}: its N x N matrices)"
            elif provider in stopped:
                row["status"] = "skipped (failed at a smaller N)"
            elif provider in last and last[provider][1] * (n / last[provider][0]) ** 2 > limit:
                row["status"] = f"skipped (extrapolated memory over 80% of {fmt_bytes(limit / 0.8)} available)"
            else:
                row.update(spawn_case(provider, n, args.dim, args.dtype, device, args.budget, args.timeout,
                                      args.threads if device == "cpu" else 0))
                if row["status"] == "ok":
                    last[provider] = (n, row["peak_extra_bytes"])
                else:
                    stopped.add(provider)
            print(json.dumps(row), flush=True)
            rows.append(row)
    ok = {(r["provider"], r["n"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        base = ok.get(("open_clip", r["n"]))
        if r["status"] == "ok" and base is not None and r["provider"] != "open_clip":
            r["time_ratio"] = f"{r['fwd_bwd_s'] / base['fwd_bwd_s']:.2f}x"
            r["memory_ratio"] = f"{r['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):.3f}x"
    env["load_average_end"] = timing.load_average()
    tag = "cpu" if device == "cpu" else "gpu"
    prefix = args.out or os.path.join(HERE, "results", f"siglip_{tag}_{datetime.date.today().isoformat()}")
    with open(prefix + ".json", "w") as f:
        json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(rows, env, args))
    print(markdown(rows, env, args))


if __name__ == "__main__":
    main()
