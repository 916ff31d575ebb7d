"""The headline numbers of a GPU run, in one call, each written as soon as it is measured.

1. gemm: the bf16 rate of torch.matmul on a square 8192^3 product (random data): the ceiling to compare with.
2. supcon: SupCon L_out fwd+bwd at N = 32768 anchors, D = 128, bf16: triton, cuda, chunked, the
   SupContrast-style eager loss and the same loss through torch.compile.
3. clip: CLIP (both directions) at N = 65536 rows per side, D = 512, bf16: ours (triton, chunked) against
   Inf-CL 1.2.1 and memeff 0.3.1 (reported "not installed (not carried)" when their wheels did not travel).
4. siglip: SigLIP (learnable scale and bias) at N = 65536 rows per side, D = 512, bf16: ours (triton, chunked)
   against open_clip's SigLipLoss (its loss.py; "skipped" when .compat_libs did not travel).
5. largest_n: the largest N that runs fwd+bwd at D = 128, bf16, doubling from 131072 within a time box,
   on the faster of triton and cuda in section 2; largest_n_siglip: the same for SigLIP on triton at D = 512
   (a third of that box).

Each case of sections 2-3 runs in its own process (bench/run.py --case: its peak memory is its own, and a
crash cannot take the others down); timings follow bench/timing.py (fwd and bwd separately, repeats,
median, min and noise band, CUDA events). Every provider's loss value is recorded beside its time: the
providers of a section compute the same loss, so a value far from the others' is a bug, not a speed-up.
``--rehearsal`` (the default without a GPU) runs the same code at tiny sizes, for CI.

    python bench/headline.py --out-dir bench/results/gpu_2026-12-01 [--time-box 240]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402
import timing  # noqa: E402

GPU = {"gemm": 8192, "supcon": (32768, 128), "clip": (65536, 512), "siglip": (65536, 512), "largest_from": 131072,
       "budget_s": 2.0,
       "timeout_s": 120.0, "compile_timeout_s": 180.0, "min_left_s": 10.0}
REHEARSAL = {"gemm": 256, "supcon": (64, 16), "clip": (64, 32), "siglip": (64, 32), "largest_from": 32,
             "budget_s": 0.3,
             "timeout_s": 60.0, "compile_timeout_s": 60.0, "min_left_s": 1.0}
SUPCON_PROVIDERS = ["triton", "cuda", "chunked", "supcontrast", "supcontrast-compiled"]
CLIP_PROVIDERS = ["clip:triton", "infcl-clip", "memeff-clip", "clip:chunked"]
SIGLIP_PROVIDERS = ["siglip:triton", "open_clip-siglip", "siglip:chunked"]
DTYPE = "bfloat16"


class Report:
    """headline.json and headline.md, rewritten whole after every case (a kill leaves what finished)."""

    def __init__(self, out_dir, env):
        self.out_dir, self.data = out_dir, {"environment": env, "gemm": None, "supcon": [], "clip": [],
                                            "siglip": [], "largest_n": [], "largest_n_siglip": []}
        os.makedirs(out_dir, exist_ok=True)

    def save(self):
        self.data["environment"]["load_average_now"] = timing.load_average()
        with open(os.path.join(self.out_dir, "headline.json"), "w") as f:
            json.dump(self.data, f, indent=1)
        with open(os.path.join(self.out_dir, "headline.md"), "w") as f:
            f.write(markdown(self.data))


def _loss_check(rows):
    """Each ok row's loss against the first ok row's (relative difference): they compute the same loss."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("loss_value") is not None]
    for r in ok:
        ref = ok[0]["loss_value"]
        r["loss_vs_first"] = abs(r["loss_value"] - ref) / max(abs(ref), 1e-30)


def _case_table(rows, flops_of):
    lines = ["| provider | fwd | bwd | fwd+bwd | min | noise | reps | TFLOP/s (6N²D) | peak extra memory | loss | "
             "loss vs first | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tflops = f"{flops_of(r) / r['fwd_bwd_s'] / 1e12:.1f}" if r.get("fwd_bwd_s") else "-"
        loss = f"{r['loss_value']:.6g}" if r.get("loss_value") is not None else "-"
        diff = f"{r['loss_vs_first']:.1e}" if "loss_vs_first" in r else "-"
        lines.append(f"| {r['provider']} | {run.fmt_time(r.get('fwd_s'))} | {run.fmt_time(r.get('bwd_s'))} | "
                     f"{run.fmt_time(r.get('fwd_bwd_s'))} | {run.fmt_time(r.get('fwd_bwd_min_s'))} | "
                     f"{run.fmt_noise(r)} | {r.get('reps', '-')} | {tflops} | "
                     f"{run.fmt_bytes(r.get('peak_extra_bytes'))} | {loss} | {diff} | {r['status']} |")
    return lines


def markdown(d):
    env = d["environment"]
    lines = [f"# Headline: {env['device']}", "",
             f"torch {env['torch']} (CUDA {env.get('cuda')}) · triton {env.get('triton')} · inf-cl {env.get('inf-cl')} · "
             f"memeff {env.get('memeff')} · commit {env.get('git_commit')} · {env['date']} · load average "
             f"{env.get('load_average')} at the start, {env.get('load_average_now')} at the last write", "",
             "Timing (bench/timing.py): fwd (with autograd recording) and bwd timed separately in every repeat with "
             f"{'CUDA events' if env.get('timer') == 'cuda' else 'the host clock'}; medians, `min` the fastest fwd+bwd, "
             "`noise` half the 20-80% quantile spread over the median. TFLOP/s counts the minimal products, 6N²D "
             "(2N²D forward, 4N²D backward). `loss vs first`: relative difference from the first provider's loss "
             "(the same loss: bf16 rounding allows ~1e-3).", ""]
    g = d.get("gemm")
    lines.append("## bf16 GEMM")
    if g:
        lines.append(f"torch.matmul {g['dtype']} {g['m']}x{g['k']} @ {g['k']}x{g['n']}: median {g['tflops']:.1f} "
                     f"TFLOP/s ({run.fmt_time(g['stats']['median'])}; min {run.fmt_time(g['stats']['min'])}, "
                     f"20-80% {run.fmt_time(g['stats']['q20'])}-{run.fmt_time(g['stats']['q80'])}).")
    lines.append("")
    for key, title in (("supcon", "SupCon L_out, 2 views, temperature 0.1"),
                       ("clip", "CLIP, both directions, logit scale 10"),
                       ("siglip", "SigLIP, learnable logit scale 10 and bias -10")):
        rows = d[key]
        if rows:
            n, dim = rows[0]["n"], rows[0]["dim"]
            lines += [f"## {title}: N = {n}, D = {dim}, {rows[0]['dtype']}", ""]
            lines += _case_table(rows, lambda r: 6 * r["n"] ** 2 * r["dim"]) + [""]
    for key in ("largest_n", "largest_n_siglip"):
        if not d.get(key):
            continue
        ok = [r for r in d[key] if r["status"] == "ok"]
        lines += [f"## Largest N{' (SigLIP)' if key.endswith('siglip') else ''}, fwd+bwd, D = {d[key][0].get('dim')}, "
                  f"{DTYPE}", ""]
        if ok:
            best = ok[-1]
            lines += [f"Largest N run: **{best['n']}** on {best['provider']} (first call {run.fmt_time(best['first_s'])}, "
                      f"which includes compilation/autotuning at a new size; steady "
                      f"{run.fmt_time(best.get('steady_s'))}; peak {run.fmt_bytes(best.get('peak_bytes'))}).", ""]
        lines += ["| provider | N | first call | steady | peak memory | status |", "|---|---|---|---|---|---|"]
        for r in d[key]:
            lines.append(f"| {r.get('provider')} | {r['n']} | {run.fmt_time(r.get('first_s'))} | "
                         f"{run.fmt_time(r.get('steady_s'))} | {run.fmt_bytes(r.get('peak_bytes'))} | {r['status']} |")
    return "\n".join(lines) + "\n"


def gemm(report, size, device):
    import torch

    dtype = torch.bfloat16
    rate, dtype_name, stats = run.gemm_rate(device, m=size, k=size, n=size, dtype=dtype)
    report.data["gemm"] = {"m": size, "k": size, "n": size, "dtype": dtype_name, "tflops": rate / 1e12, "stats": stats}
    report.save()
    print(f"gemm {dtype_name} {size}^3: {rate / 1e12:.2f} TFLOP/s", flush=True)


def skip_reason(provider, device, skip):
    if provider.split(":")[-1] in skip:
        return "left out by --skip (the CUDA extension did not build: see cuda_build.log)"
    return run.provider_skip_reason(provider, device)


def cases(report, key, providers, n, dim, device, cfg, deadline, skip):
    for provider in providers:
        row = {"provider": provider, "n": n, "dim": dim, "dtype": DTYPE}
        left = deadline - time.monotonic()
        reason = skip_reason(provider, device, skip)
        if reason:
            row["status"] = f"skipped: {reason}"
        elif left < cfg["min_left_s"]:
            row["status"] = "not run (headline time box)"
        else:
            limit = cfg["compile_timeout_s" if provider.endswith("compiled") else "timeout_s"]
            row.update(run.spawn_case(provider, n, dim, DTYPE, device, cfg["budget_s"], min(limit, left)))
        report.data[key].append(row)
        _loss_check(report.data[key])
        report.save()
        print(f"{key} {provider}: {row['status']} {run.fmt_time(row.get('fwd_bwd_s'))}", flush=True)


def largest_n_child(provider, start, dim, device, box_s):
    """In a subprocess: N = start, 2 start, ... one JSON line per N, while the next N (about 4x the time)
    still fits in the box; stops at the first failure (out of memory, say)."""
    import torch

    fn = run.make_provider(provider)
    cuda = device.startswith("cuda")
    started, n = time.monotonic(), start
    while True:
        row = {"provider": provider, "n": n, "dim": dim}
        try:
            gen = torch.Generator(device=device).manual_seed(n)
            features = torch.nn.functional.normalize(
                torch.randn(n // 2, 2, dim, generator=gen, device=device, dtype=torch.float32), dim=-1).to(
                getattr(torch, DTYPE))
            labels = torch.randint(0, run.NUM_CLASSES, (n // 2,), generator=gen, device=device)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            calls = []
            for _ in range(2):
                t0 = time.monotonic()
                f = features.detach().requires_grad_()
                fn(f, labels).backward()
                if cuda:
                    torch.cuda.synchronize()
                calls.append(time.monotonic() - t0)
                if calls[0] > box_s / 8:  # no second call when the first was already long
                    break
            row.update(status="ok", first_s=calls[0], steady_s=calls[1] if len(calls) > 1 else None,
                       peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)
        except Exception as err:  # out of memory, or a failure at this size: recorded, and the last N
            oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
            row["status"] = "out of memory" if oom else f"failed: {type(err).__name__}: {str(err)[:200]}"
        print(json.dumps(row), flush=True)
        if row["status"] != "ok":
            return
        spent = time.monotonic() - started
        if spent + 4 * sum(c for c in calls) > box_s:
            return
        del features, labels, f
        n *= 2


def largest_n(report, providers, start, dim, device, box_s, skip, key="largest_n", source="supcon"):
    """Runs largest_n_child in a subprocess and records each size as it reports it (under ``key``), on the
    fastest of ``providers`` in section ``source``."""
    fastest = [r for r in report.data[source] if r["provider"] in providers and r["status"] == "ok"]
    provider = min(fastest, key=lambda r: r["fwd_bwd_s"])["provider"] if fastest else providers[0]
    reason = skip_reason(provider, device, skip)
    if reason:
        report.data[key].append({"provider": provider, "n": start, "dim": dim, "status": f"skipped: {reason}"})
        report.save()
        return
    cmd = [sys.executable, __file__, "--largest-child", provider, str(start), str(dim), device, str(box_s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + box_s + 30
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                report.data[key].append(json.loads(line))
                report.save()
                print(f"{key} {line.strip()}", flush=True)
            if time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if not report.data[key]:
        report.data[key].append({"provider": provider, "n": start, "dim": dim,
                                         "status": f"failed: no result (exit code {proc.returncode})"})
        report.save()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", help="where headline.json and headline.md go (required)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--rehearsal", action="store_true", help="tiny sizes (the default without a GPU)")
    parser.add_argument("--time-box", type=float, default=210.0, help="seconds for the whole script")
    parser.add_argument("--largest-box", type=float, default=None, help="seconds for section 4 (default: a "
                        "fifth of the time box)")
    parser.add_argument("--skip", default="", help="comma-separated providers to leave out (the suite passes cuda "
                        "when the CUDA extension did not build: each process would try the build again)")
    parser.add_argument("--largest-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.largest_child:
        provider, start, dim, device, box = args.largest_child
        largest_n_child(provider, int(start), int(dim), device, float(box))
        return
    if not args.out_dir:
        parser.error("--out-dir is required")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = REHEARSAL if args.rehearsal or not device.startswith("cuda") else GPU
    deadline = time.monotonic() + args.time_box
    largest_box = args.largest_box or args.time_box / 5
    env = run.environment(device)
    env["mode"] = "rehearsal" if cfg is REHEARSAL else "gpu"
    skip = set(filter(None, args.skip.split(",")))
    report = Report(args.out_dir, env)
    report.save()
    try:
        gemm(report, cfg["gemm"], device)
        # torch.compile's minute of compilation goes after the CLIP comparison, which matters more.
        cases(report, "supcon", SUPCON_PROVIDERS[:-1], *cfg["supcon"], device, cfg, deadline - largest_box, skip)
        cases(report, "clip", CLIP_PROVIDERS, *cfg["clip"], device, cfg, deadline - largest_box, skip)
        cases(report, "siglip", SIGLIP_PROVIDERS, *cfg["siglip"], device, cfg, deadline - largest_box, skip)
        cases(report, "supcon", SUPCON_PROVIDERS[-1:], *cfg["supcon"], device, cfg, deadline - largest_box, skip)
        box = max(2.0, min(largest_box * 2 / 3, deadline - time.monotonic() - largest_box / 3 - 5))
        largest_n(report, ["triton", "cuda"], cfg["largest_from"], cfg["supcon"][1], device, box, skip)
        box = max(2.0, min(largest_box / 3, deadline - time.monotonic() - 5))
        largest_n(report, ["siglip:triton"], cfg["largest_from"], cfg["siglip"][1], device, box, skip,
                  key="largest_n_siglip", source="siglip")
    except KeyboardInterrupt:
        report.data["interrupted"] = True
        report.save()
        raise SystemExit(130)
    print(f"wrote {os.path.join(args.out_dir, 'headline.md')} and headline.json", flush=True)


if __name__ == "__main__":
    main()
