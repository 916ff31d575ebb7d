"""Benchmark: fused_contrastive's backends against the SupCon implementations users would otherwise pick.

Each (provider, N, D, dtype) case runs in its own subprocess so that its peak memory
is its own: peak RSS beyond the inputs on CPU, torch.cuda.max_memory_allocated beyond
the inputs on GPU. N counts anchors (bsz = N / 2 samples, 2 views, 'all' mode, random
labels over 100 classes). A provider is stopped at its first failure (out of memory
or over the time budget); on CPU, a case whose memory, extrapolated from the previous
N, would not fit is skipped instead of letting the machine swap or kill.

    python bench/run.py            # full run on the available device
    python bench/run.py --quick    # a small subset (a couple of minutes on a laptop CPU)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NUM_CLASSES = 100
TEMPERATURE = 0.1


# ---------------------------------------------------------------- providers
def supcontrast_style(features, labels, temperature=TEMPERATURE):
    """SupCon L_out the way the common PyTorch implementation builds it: several dense N x N tensors."""
    import torch

    bsz, n_views = features.shape[:2]
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    same = torch.eq(labels[:, None], labels[None, :]).float().repeat(n_views, n_views)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(logits.shape[0], device=logits.device)
    same = same * not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (same * log_prob).sum(1) / same.sum(1).clamp(min=1)
    return -mean_log_prob_pos.mean()


def family_loss(loss, backend):
    """One of the family's losses as (features [bsz, 2, D], labels [bsz]) -> loss, on ``backend``, with N x N
    logits for every loss (N = 2 bsz rows): the pair losses (InfoNCE, CLIP) pair each of the N rows with its
    other view; the MoCo queue and the labelled memory bank hold bsz more rows (no gradient); BCL adds one
    center per class."""
    import torch

    import fused_contrastive as fc

    t = TEMPERATURE
    bank = {}

    def pairs(f):  # every row with its other view: [N, D] x [N, D]
        return torch.cat([f[:, 0], f[:, 1]]), torch.cat([f[:, 1], f[:, 0]])

    def fixed(f, rows, labelled=False):  # a fixed queue / bank, built once per run, never a gradient
        if "keys" not in bank:
            gen = torch.Generator().manual_seed(1)
            keys = torch.nn.functional.normalize(torch.randn(rows, f.shape[-1], generator=gen), dim=-1)
            bank["keys"] = keys.to(device=f.device, dtype=f.dtype)
            bank["labels"] = torch.randint(0, NUM_CLASSES, (rows,), generator=gen).to(f.device)
            centers = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, f.shape[-1], generator=gen), dim=-1)
            bank["centers"] = centers.to(device=f.device, dtype=f.dtype).requires_grad_()
        return bank

    def single_rank_group(f):  # the distributed code path on one process: its overhead, measured
        import tempfile

        import torch.distributed as dist

        if not dist.is_initialized():
            init = os.path.join(tempfile.mkdtemp(), "init")
            dist.init_process_group("nccl" if f.is_cuda else "gloo", init_method=f"file://{init}", rank=0,
                                    world_size=1)
        return dist.group.WORLD

    losses = {
        "supcon": lambda f, y: fc.supcon_loss(f, y, temperature=t, backend=backend),
        "supcon_gather_1rank": lambda f, y: fc.supcon_loss(f, y, temperature=t, backend=backend,
                                                           process_group=single_rank_group(f)),
        "supcon_ring_1rank": lambda f, y: fc.supcon_loss(f, y, temperature=t, backend=backend, distributed="ring",
                                                         process_group=single_rank_group(f)),
        "supcon_in": lambda f, y: fc.supcon_loss(f, y, temperature=t, variant="in", backend=backend),
        "supcon_extra_keys": lambda f, y: fc.supcon_loss(f, y, temperature=t, backend=backend,
                                                         extra_keys=fixed(f, f.shape[0])["keys"],
                                                         extra_key_labels=fixed(f, f.shape[0])["labels"]),
        "eps_supinfonce": lambda f, y: fc.eps_supinfonce_loss(f, y, temperature=t, backend=backend),
        "dcl": lambda f, y: fc.dcl_loss(f, temperature=t, backend=backend),
        "dclw": lambda f, y: fc.dcl_loss(f, temperature=t, weighted=True, backend=backend),
        "info_nce": lambda f, y: fc.info_nce(*pairs(f), temperature=t, backend=backend),
        "info_nce_queue": lambda f, y: fc.info_nce(*pairs(f), temperature=t, backend=backend,
                                                   queue=fixed(f, f.shape[0])["keys"]),
        "clip": lambda f, y: fc.clip_loss(*pairs(f), 1.0 / t, backend=backend),
        "debiased": lambda f, y: fc.debiased_contrastive_loss(f, temperature=0.5, beta=1.0, backend=backend),
        "bcl": lambda f, y: fc.bcl_loss(f, y, temperature=t, class_centers=fixed(f, 1)["centers"], backend=backend),
        "spread": lambda f, y: fc.spread_loss(f, y, temperature=0.5, backend=backend),
    }
    return losses[loss]


def make_provider(name):
    """A callable (features [bsz, views, D], labels [bsz]) -> scalar loss, or raise ImportError with why."""
    import torch

    if ":" in name:  # "<loss>:<backend>", the family benchmark's providers (bench/family.py)
        return family_loss(*name.split(":"))
    if name in ("chunked", "reference", "triton", "cuda"):
        import fused_contrastive as fc

        return lambda f, y: fc.supcon_loss(f, y, temperature=TEMPERATURE, backend=name)
    if name == "supcontrast":
        return supcontrast_style
    if name == "supcontrast-compiled":
        return torch.compile(supcontrast_style)
    if name == "pml":
        from pytorch_metric_learning.losses import SupConLoss

        pml = SupConLoss(temperature=TEMPERATURE)

        def run(f, y):
            flat = torch.cat(torch.unbind(f, dim=1), dim=0)
            return pml(flat, y.repeat(f.shape[1]))

        return run
    if name == "infcl":
        # Inf-CL (pip install inf-cl) computes a CLIP-style loss of one positive per row, no self
        # exclusion: not the same loss, shown for scale. Its two sides are the two views.
        from inf_cl import cal_inf_loss

        return lambda f, y: cal_inf_loss(f[:, 0].contiguous(), f[:, 1].contiguous(), scale=1.0 / TEMPERATURE)
    raise ValueError(name)


def provider_skip_reason(name, device):
    import importlib.util

    import fused_contrastive as fc
    import torch

    if name in ("chunked", "reference", "triton", "cuda"):
        probe = torch.zeros(4, 2, 8, device=device)
        return fc.explain_backends(probe, torch.arange(4, device=device))[name]
    if name == "pml" and importlib.util.find_spec("pytorch_metric_learning") is None:
        return "pytorch-metric-learning is not installed (pip install pytorch-metric-learning)"
    if name == "supcontrast-compiled" and device == "cpu":
        return "torch.compile is measured on GPU only"
    if name == "infcl":
        if device == "cpu":
            return "Inf-CL runs on CUDA devices only"
        if importlib.util.find_spec("inf_cl") is None:
            return "inf-cl is not installed (pip install inf-cl)"
    return None


# ---------------------------------------------------------------- one case (in a subprocess)
def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss():
    """Linux resets the peak RSS (VmHWM) when 5 is written to clear_refs; imports' peaks then don't count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_case(provider, n, dim, dtype_name, device, budget_s):
    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    bsz = n // 2
    features = torch.nn.functional.normalize(torch.randn(bsz, 2, dim, generator=gen), dim=-1)
    features = features.to(device=device, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (bsz,), generator=gen).to(device)
    fn = make_provider(provider)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def fwd_bwd():
        f = features.detach().requires_grad_()
        fn(f, labels).backward()

    def fwd():
        with torch.no_grad():
            fn(features, labels)

    if cuda:  # Triton compiles and autotunes on the first call: keep that out of time and memory
        fwd_bwd()
        fwd()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    fwd_bwd()  # the peak-memory measurement, and the time when one call is already long
    sync()
    first = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_status_bytes("VmHWM") - base

    def median_time(step):
        if cuda:
            import triton.testing

            return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median") / 1e3
        times, spent = [], 0.0
        while len(times) < 5 and (not times or spent + times[-1] < budget_s):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            spent += times[-1]
            if times[-1] > budget_s / 3:
                break
        return statistics.median(times)

    # A call already this long is timed once: repeats would not change the picture, only the run time.
    long_s = budget_s / 20 if cuda else budget_s / 3

    def single(step):
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    fwd_bwd_s = first if first > long_s else median_time(fwd_bwd)
    fwd_single = single(fwd)
    fwd_s = fwd_single if fwd_single > long_s else median_time(fwd)
    return {"fwd_s": fwd_s, "fwd_bwd_s": fwd_bwd_s, "bwd_s": max(fwd_bwd_s - fwd_s, 0.0), "peak_extra_bytes": max(peak, 0)}


def gemm_rate(device, n=8192, dim=128):
    """bf16 (GPU) or fp32 (CPU) torch.matmul rate in FLOP/s for the loss's GEMM shape [n, D] x [D, n]."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, dim, device=device, dtype=dtype)
    if device.startswith("cuda"):
        import triton.testing

        t = triton.testing.do_bench(lambda: a @ a.T, return_mode="median") / 1e3
    else:
        a @ a.T
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a.T
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
    return 2 * n * n * dim / t, str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- the driver
def environment(device):
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for dist in ("triton", "pytorch-metric-learning", "fused_contrastive"):
        try:
            import importlib.metadata

            info[dist] = importlib.metadata.version(dist)
        except Exception:
            info[dist] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, check=True).stdout.strip()
    except Exception:
        info["git_commit"] = None
    return info


def available_memory_bytes(device):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[1]
    with open("/proc/meminfo") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return fields["MemAvailable"]


def spawn_case(provider, n, dim, dtype, device, budget_s, timeout_s):
    cmd = [sys.executable, __file__, "--case", provider, str(n), str(dim), dtype, device, str(budget_s)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"over the {timeout_s:.0f} s time limit"}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()
        last = tail[-1] if tail else f"exit code {out.returncode}"
        oom = "out of memory" in out.stderr.lower() or "can't allocate" in out.stderr.lower() or out.returncode == -9
        return {"status": "out of memory" if oom else f"failed: {last[:200]}"}
    return {"status": "ok", **json.loads(out.stdout.strip().splitlines()[-1])}


def fmt_bytes(b):
    return "-" if b is None else (f"{b / 2**30:.2f} GB" if b >= 2**30 else f"{b / 2**20:.0f} MB")


def fmt_time(t):
    return "-" if t is None else (f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.1f} ms")


def markdown(rows, env, baseline):
    lines = [f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · "
             f"commit {env['git_commit']} · {env['date']}", "",
             f"SupCon (L_out, 'all', 2 views, temperature {TEMPERATURE}); bwd = fwd+bwd - fwd (no-grad forward); "
             f"peak memory beyond the inputs; ratios of fwd+bwd time and peak memory against `{baseline}` in the same run; "
             f"GEMM rate: torch.matmul {env.get('gemm_dtype')} at {env.get('gemm_flops', 0) / 1e12:.3f} TFLOP/s.", "",
             "| provider | N | D | dtype | fwd | bwd | fwd+bwd | peak extra memory | time vs " + baseline
             + " | memory vs " + baseline + " | TFLOP/s (6N²D) | of GEMM rate | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tflops = f"{r['tflops']:.3f}" if "tflops" in r else "-"
        frac = f"{100 * r['fraction_of_gemm']:.0f}%" if "fraction_of_gemm" in r else "-"
        lines.append(f"| {r['provider']} | {r['n']} | {r['dim']} | {r['dtype']} | {fmt_time(r.get('fwd_s'))} | "
                     f"{fmt_time(r.get('bwd_s'))} | {fmt_time(r.get('fwd_bwd_s'))} | {fmt_bytes(r.get('peak_extra_bytes'))} | "
                     f"{r.get('time_ratio', '-')} | {r.get('memory_ratio', '-')} | {tflops} | {frac} | {r['status']} |")
    return "\n".join(lines) + "\n"


def add_ratios(rows, baseline):
    base = {(r["n"], r["dim"], r["dtype"]): r for r in rows if r["provider"] == baseline and r["status"] == "ok"}
    for r in rows:
        b = base.get((r["n"], r["dim"], r["dtype"]))
        if r["status"] == "ok" and b is not None and r["provider"] != baseline:
            r["time_ratio"] = f"{r['fwd_bwd_s'] / b['fwd_bwd_s']:.2f}x"
            r["memory_ratio"] = f"{r['peak_extra_bytes'] / max(b['peak_extra_bytes'], 1):.3f}x"


def plot(rows, path_prefix):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    paths = []
    groups = sorted({(r["dim"], r["dtype"]) for r in rows})
    for dim, dtype in groups:
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for provider in dict.fromkeys(r["provider"] for r in rows):
            pts = [r for r in rows if r["provider"] == provider and r["dim"] == dim and r["dtype"] == dtype and r["status"] == "ok"]
            if not pts:
                continue
            ns = [r["n"] for r in pts]
            ax_t.plot(ns, [r["fwd_bwd_s"] for r in pts], "o-", label=provider)
            ax_m.plot(ns, [max(r["peak_extra_bytes"], 1) / 2**20 for r in pts], "o-", label=provider)
        for ax, title in ((ax_t, "fwd+bwd time (s)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (anchors)")
            ax.set_title(f"{title}, D={dim}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend()
        fig.tight_layout()
        path = f"{path_prefix}_D{dim}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--providers", default=None, help="comma-separated subset")
    parser.add_argument("--sizes", default=None, help="comma-separated N values")
    parser.add_argument("--dims", default=None, help="comma-separated D values")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for JSON, markdown and PNG")
    parser.add_argument("--tag", default=None, help="file name stem (default: device and date)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="launch no new case after this long (the rest is recorded as not run)")
    parser.add_argument("--case", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        provider, n, dim, dtype, device, budget = args.case
        print(json.dumps(run_case(provider, int(n), int(dim), dtype, device, float(budget))))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    providers = ["chunked", "triton", "cuda", "reference", "supcontrast", "supcontrast-compiled", "pml", "infcl"]
    if args.providers:
        providers = args.providers.split(",")
    if args.quick:
        sizes, dims = [1024, 2048, 4096], [128]
    else:
        sizes = [1024 * 2**k for k in range(12 if gpu else 6)]
        dims = [128, 512]
    # On CPU, D = 512 stops at N = 8192 so that the full run stays within about 10 minutes.
    max_n = {512: 8192} if not gpu and not args.sizes else {}
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sizes
    dims = [int(d) for d in args.dims.split(",")] if args.dims else dims
    dtypes = args.dtypes.split(",") if args.dtypes else (["bfloat16", "float32"] if gpu else ["float32"])
    budget_s = 20.0 if gpu else 15.0
    timeout_s = 300.0 if gpu else 180.0
    baseline = "supcontrast"

    env = environment(device)
    memory_limit = 0.8 * available_memory_bytes(device)
    rate, rate_dtype = gemm_rate(device)
    env["gemm_flops"], env["gemm_dtype"] = rate, rate_dtype
    print(f"{env['device']}: torch.matmul {rate_dtype} [8192x128]x[128x8192] at {rate / 1e9:.1f} GFLOP/s")

    from tqdm import tqdm

    active = []
    for p in providers:
        reason = provider_skip_reason(p, device)
        if reason:
            print(f"skipping {p}: {reason}")
        else:
            active.append(p)
    # N-major within each (D, dtype): every provider gets each N before the next, so a time budget
    # cut leaves complete comparisons at the smaller sizes.
    cases = [(p, n, d, t) for d in dims for t in dtypes for n in sizes for p in active if n <= max_n.get(d, n)]
    rows, stopped, last_peak = [], {}, {}
    started = time.perf_counter()
    for provider, n, dim, dtype in tqdm(cases, desc="bench", unit="case"):
        key = (provider, dim, dtype)
        row = {"provider": provider, "n": n, "dim": dim, "dtype": dtype}
        prev = last_peak.get(key)
        if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
            row["status"] = f"not run (past the {args.max_minutes:g}-minute budget)"
        elif key in stopped:
            row["status"] = f"not run ({stopped[key]} at a smaller N)"
        elif prev is not None and prev[1] * (n / prev[0]) ** 2 > memory_limit:
            row["status"] = f"skipped: extrapolated peak {fmt_bytes(prev[1] * (n / prev[0]) ** 2)} over the {fmt_bytes(memory_limit)} limit"
            stopped[key] = "memory limit"
        else:
            row.update(spawn_case(provider, n, dim, dtype, device, budget_s, timeout_s))
            if row["status"] != "ok":
                stopped[key] = row["status"]
            else:
                last_peak[key] = (n, row["peak_extra_bytes"])
                flops = 6 * n * n * dim
                row["tflops"] = flops / row["fwd_bwd_s"] / 1e12
                row["fraction_of_gemm"] = flops / row["fwd_bwd_s"] / rate
        rows.append(row)
    add_ratios(rows, baseline)

    md = markdown(rows, env, baseline)
    print("\n" + md)
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or f"{'quick_' if args.quick else ''}{'gpu' if gpu else 'cpu'}_{env['date'][:10]}"
    stem = os.path.join(args.out, tag)
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md)
    written = [stem + ".json", stem + ".md"] + plot(rows, stem)
    print("wrote " + ", ".join(os.path.relpath(p, ROOT) for p in written))


if __name__ == "__main__":
    main()
