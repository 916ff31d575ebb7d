"""Correctness smoke for a GPU run: every loss of the package x backend x dtype x N x temperature, the loss
and the gradient of every input against the float64 reference backend on the same device, one line per case.

Inputs are drawn in float64, rounded to the case's dtype, and the oracle runs on those rounded values
upcast to float64 (so the tolerance bounds the backend's arithmetic, not the input rounding); errors are
relative Frobenius norms with tests/helpers.py's tolerance table. N is the batch: samples of two views
for the view losses, rows of each side for the paired ones. A case is `n/a` when the backend does not
cover the loss ("cannot run this input") or when the oracle itself rejects the input (a loss that needs
two samples at N = 1); every other exception, a non-finite value or an error over the tolerance FAILs, except
gradients of a saturated loss (``SAT``: the loss below float64's epsilon, both gradients below epsilon / t, a
scale no softmax formulation resolves, the float64 oracle's included), which are reported, not judged.

Cases run in worker processes, one (loss, dtype) group at a time in the priority order below, so that
Triton's compilations overlap; each group's lines are written as soon as it finishes, and the summary
line comes last, also when the time box or SIGINT stops the run early (the rest are counted `not run`).

    python bench/gpu_smoke.py --out smoke.txt                       # every backend that exists here
    python bench/gpu_smoke.py --out smoke.txt --backends cuda --append
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

NUM_CLASSES = 10


def _inputs(bsz, dim, seed):
    """float64 tensors for every loss at batch ``bsz``: unit feature rows, labels, a mask, a queue, centers."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)

    feats, labels = unit(bsz, 2, dim), torch.randint(0, NUM_CLASSES, (bsz,), generator=gen)
    t = {"feats": feats, "labels": labels, "mask": (torch.rand(bsz, bsz, generator=gen) < 0.3).float(),
         "queue": unit(bsz // 2 + 1, dim), "centers": unit(NUM_CLASSES, dim)}
    t["bias"] = torch.randint(0, 3, (bsz,), generator=gen)  # FairKL's bias labels, drawn last (the rest unchanged)
    # CoMatch's pseudo-label probabilities, of the batch and of the queue (as a bank): smoothed one-hots, whose
    # products (0.42 within a class, 0.06 across) straddle the cases' threshold 0.3
    one_hot = torch.nn.functional.one_hot(torch.cat([labels, labels[: t["queue"].shape[0]]]),
                                          NUM_CLASSES).to(torch.float64)
    probs = 0.6 * one_hot + 0.4 / NUM_CLASSES
    t["probs"], t["queue_probs"] = probs[:bsz], probs[bsz:]
    return t


def losses():
    """name -> (names of the float tensors that get gradients, fn(tensors dict, backend, temperature)),
    in priority order: SupCon first (the package's headline), then the rest of the family."""
    import fused_contrastive as fc

    def views(t):
        return t["feats"]

    def pair(t):
        return t["feats"][:, 0], t["feats"][:, 1]

    return {
        "supcon": (["feats"], lambda t, b, tau: fc.supcon_loss(views(t), t["labels"], temperature=tau, backend=b)),
        "simclr": (["feats"], lambda t, b, tau: fc.supcon_loss(views(t), temperature=tau, backend=b)),
        "supcon_one": (["feats"], lambda t, b, tau: fc.supcon_loss(views(t), t["labels"], temperature=tau,
                                                                   contrast_mode="one", backend=b)),
        "supcon_mask": (["feats"], lambda t, b, tau: fc.supcon_loss(views(t), mask=t["mask"], temperature=tau,
                                                                    backend=b)),
        "supcon_in": (["feats"], lambda t, b, tau: fc.supcon_loss(views(t), t["labels"], temperature=tau,
                                                                  variant="in", backend=b)),
        "supcon_extra_keys": (["feats", "queue"], lambda t, b, tau: fc.supcon_loss(
            views(t), t["labels"], temperature=tau, extra_keys=t["queue"],
            extra_key_labels=t["labels"][: t["queue"].shape[0]], backend=b)),
        "clip": (["feats"], lambda t, b, tau: fc.clip_loss(*pair(t), 1.0 / tau, backend=b)),
        # logit scale 0.1 / temperature (10 and 0.2): at 1 / temperature = 100 a lone, well-matched pair's gradient
        # (sigmoid(-90) ~ 1e-39 times the scale) lies below fp16's smallest subnormal, 0 in any fp16 output.
        "siglip": (["feats"], lambda t, b, tau: fc.siglip_loss(*pair(t), 0.1 / tau, -5.0, backend=b)),
        "siglip_labels": (["feats"], lambda t, b, tau: fc.siglip_loss(*pair(t), 0.1 / tau, -5.0, t["labels"],
                                                                      backend=b)),
        "info_nce": (["feats"], lambda t, b, tau: fc.info_nce(*pair(t), temperature=tau, backend=b)),
        "info_nce_queue": (["feats"], lambda t, b, tau: fc.info_nce(*pair(t), temperature=tau, queue=t["queue"],
                                                                    backend=b)),
        "info_nce_moco": (["feats"], lambda t, b, tau: fc.info_nce(*pair(t), temperature=tau, queue=t["queue"],
                                                                   in_batch_negatives=False, backend=b)),
        "info_nce_symmetric": (["feats"], lambda t, b, tau: fc.info_nce(*pair(t), temperature=tau, symmetric=True,
                                                                        backend=b)),
        "eps_supinfonce": (["feats"], lambda t, b, tau: fc.eps_supinfonce_loss(views(t), t["labels"],
                                                                               temperature=tau, backend=b)),
        "dcl": (["feats"], lambda t, b, tau: fc.dcl_loss(views(t), temperature=tau, backend=b)),
        "dclw": (["feats"], lambda t, b, tau: fc.dcl_loss(views(t), temperature=tau, weighted=True, backend=b)),
        "debiased": (["feats"], lambda t, b, tau: fc.debiased_contrastive_loss(views(t), temperature=tau,
                                                                               backend=b)),
        "debiased_hard": (["feats"], lambda t, b, tau: fc.debiased_contrastive_loss(views(t), temperature=tau,
                                                                                    beta=1.0, backend=b)),
        "bcl": (["feats", "centers"], lambda t, b, tau: fc.bcl_loss(views(t), t["labels"], temperature=tau,
                                                                    class_centers=t["centers"], backend=b)),
        "spread": (["feats"], lambda t, b, tau: fc.spread_loss(views(t), t["labels"], temperature=tau, backend=b)),
        "symmetric_spread": (["feats"], lambda t, b, tau: fc.symmetric_spread_loss(views(t), t["labels"],
                                                                                   temperature=tau, backend=b)),
        "dclw_learned": (["feats"], lambda t, b, tau: fc.dcl_loss(views(t), temperature=tau, weighted=True,
                                                                  detach_weight=False, backend=b)),
        "suncet": (["feats"], lambda t, b, tau: fc.suncet_loss(views(t), t["labels"], temperature=tau, backend=b)),
        "sce": (["feats"], lambda t, b, tau: fc.sce_loss(*pair(t), temperature=tau, backend=b)),
        "sce_queue": (["feats"], lambda t, b, tau: fc.sce_loss(*pair(t), queue=t["queue"], temperature=tau, lam=0.3,
                                                               backend=b)),
        "comatch": (["feats"], lambda t, b, tau: fc.comatch_loss(*pair(t), t["probs"], temperature=tau, threshold=0.3,
                                                                 backend=b)),
        "comatch_bank": (["feats"], lambda t, b, tau: fc.comatch_loss(*pair(t), t["probs"], bank=t["queue"],
                                                                      bank_probs=t["queue_probs"], temperature=tau,
                                                                      threshold=0.3, backend=b)),
        "paco": (["feats", "centers"], lambda t, b, tau: fc.paco_loss(views(t), t["labels"], t["centers"], alpha=0.05,
                                                                      gamma=0.5, supervised_temperature=1.0,
                                                                      label_smoothing=0.1, temperature=tau, backend=b)),
        "fairkl": (["feats"], lambda t, b, tau: fc.fairkl_loss(views(t), t["labels"], t["bias"], temperature=tau,
                                                               backend=b)),
        "fairkl_regularizer": (["feats"], lambda t, b, tau: fc.fairkl_regularizer(views(t), t["labels"], t["bias"],
                                                                                  temperature=tau, backend=b)),
        # RényiCL: the two views as sources, the next sample's views as the targets (both get gradients; targets
        # equal to the sources would make the loss 0 - 0 at t = 0.01, all of it cancellation); CACR has no
        # temperature: tau_neg = 0.1 / temperature (10 and 0.2), Euclidean and RBF costs.
        "renyicl": (["feats"], lambda t, b, tau: fc.renyicl_loss(views(t), views(t).roll(1, 0), temperature=tau,
                                                                 backend=b)),
        "cacr": (["feats"], lambda t, b, tau: fc.cacr_loss(views(t), tau_neg=0.1 / tau, debiased=True, backend=b)),
        "cacr_rbf": (["feats"], lambda t, b, tau: fc.cacr_loss(views(t), tau_neg=0.1 / tau, cost="rbf", backend=b)),
    }


def _evaluate(fn, base, grad_names, dtype, device, backend, tau):
    """(loss, {name: grad}) of ``fn`` on ``base`` rounded to ``dtype`` and moved to ``device``."""
    import torch

    t = {k: (v.to(dtype) if v.is_floating_point() and k != "mask" else v).to(device) for k, v in base.items()}
    for name in grad_names:
        t[name] = t[name].detach().requires_grad_()
    loss = fn(t, backend, tau)
    grads = torch.autograd.grad(loss, [t[name] for name in grad_names])
    return loss, dict(zip(grad_names, grads))


def run_group(job):
    """Every case of one (loss, dtype): a list of result lines (worker process)."""
    import torch

    from helpers import TOLERANCES, relative_error

    loss_name, dtype_name, sizes, temperatures, backends, dim, device = job
    grad_names, fn = losses()[loss_name]
    dtype = getattr(torch, dtype_name)
    tol = TOLERANCES[dtype]
    lines = []
    for n in sizes:
        base = _inputs(n, dim, seed=n)
        rounded = {k: (v.to(dtype).double() if v.is_floating_point() and k != "mask" else v) for k, v in base.items()}
        for tau in temperatures:
            oracle = None
            for backend in backends:
                head = f"{loss_name:<19} {backend:<8} {dtype_name:<8} N={n:<5} t={tau:<5}"
                t0 = time.perf_counter()
                try:
                    loss, grads = _evaluate(fn, rounded, grad_names, dtype, device, backend, tau)
                except (ValueError, RuntimeError) as err:
                    unsupported = isinstance(err, RuntimeError) and "cannot run this input" in str(err)
                    if not unsupported and isinstance(err, ValueError):
                        try:  # the input itself is invalid for this loss when the oracle rejects it too
                            _evaluate(fn, rounded, grad_names, torch.float64, device, "reference", tau)
                        except ValueError:
                            unsupported = True
                        except Exception:
                            pass
                    msg = " ".join(str(err).split())[:160]
                    lines.append(f"{'n/a' if unsupported else 'ERROR':<5} {head} {type(err).__name__}: {msg}")
                    continue
                except Exception as err:  # a crash of the backend: a failure, and the run goes on
                    lines.append(f"ERROR {head} {type(err).__name__}: {' '.join(str(err).split())[:160]}")
                    continue
                if oracle is None:
                    oracle = _evaluate(fn, rounded, grad_names, torch.float64, device, "reference", tau)
                errors = {"loss": relative_error(loss.cpu(), oracle[0].cpu())}
                for name in grad_names:
                    errors[name] = relative_error(grads[name].cpu(), oracle[1][name].cpu())
                finite = all(bool(torch.isfinite(x).all()) for x in [loss, *grads.values()])
                wrong_dtype = [k for k, g in grads.items() if g.dtype != dtype]
                worst = max(errors.values())
                ok = finite and not wrong_dtype and worst <= tol
                # A saturated loss (below float64's epsilon: N = 1 at t = 0.01, a positive ahead by ~60 logits)
                # has gradients of its size that no softmax formulation resolves, the float64 oracle's
                # included: p_pos - 1 rounds to 0 next to terms of e^-60. Its loss is still compared; its
                # gradients are reported, not judged (SAT, neither a pass nor a failure).
                status = "PASS" if ok else "FAIL"
                tiny = torch.finfo(torch.float64).eps / tau  # a gradient at the saturated loss's own scale
                if not ok and finite and not wrong_dtype and errors["loss"] <= tol \
                        and float(oracle[0].detach().abs()) < torch.finfo(torch.float64).eps \
                        and all(float(g.detach().double().norm()) < tiny and float(oracle[1][k].norm()) < tiny
                                for k, g in grads.items() if errors[k] > tol):
                    status = "SAT"
                detail = ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
                note = ("" if finite else " non-finite") + (f" grad dtype of {wrong_dtype} != {dtype_name}"
                                                           if wrong_dtype else "")
                note += f" (oracle loss {float(oracle[0]):.1e})" if status == "SAT" else ""
                lines.append(f"{status:<5} {head} worst {worst:.2e} / tol {tol:.1e} [{detail}]"
                             f"{note} {time.perf_counter() - t0:.2f}s")
    return lines


def _fp32_products_in_fp32():
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # the package's default precision, which the tolerances assume


def _init_worker():
    import signal

    # SIGINT (the suite's time limit) reaches the whole process group: the parent writes the summary and
    # ends the workers, which must not die first in the middle of a line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _fp32_products_in_fp32()


def _in_process(jobs):
    _fp32_products_in_fp32()
    for job in jobs:
        yield run_group(job)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the result file (one line per case, then a summary)")
    parser.add_argument("--append", action="store_true", help="append to --out instead of starting it")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--backends", default="triton,cuda,chunked")
    parser.add_argument("--losses", default=None, help="comma-separated subset (default: all, in priority order)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--sizes", default="1,127,4099")
    parser.add_argument("--temperatures", default="0.01,0.5")
    parser.add_argument("--dim", type=int, default=64, help="feature dimension (64: Triton's fp32 limit)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: from the CPUs; 0: run every case in this process)")
    parser.add_argument("--time-box", type=float, default=150.0, help="seconds; groups not finished are 'not run'")
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = args.losses.split(",") if args.losses else list(losses())
    unknown = sorted(set(names) - set(losses()))
    if unknown:
        raise SystemExit(f"--losses: unknown {unknown}; known: {list(losses())}")
    sizes = [int(s) for s in args.sizes.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    backends = args.backends.split(",")
    jobs = [(name, dt, sizes, temps, backends, args.dim, device) for name in names for dt in args.dtypes.split(",")]
    per_job = len(sizes) * len(temps) * len(backends)
    workers = args.workers if args.workers is not None else max(1, min(len(jobs), (os.cpu_count() or 2) - 4))
    counts = {"PASS": 0, "FAIL": 0, "ERROR": 0, "n/a": 0, "SAT": 0}
    reasons = {}
    started = time.perf_counter()
    finished = 0
    interrupted = None
    with open(args.out, "a" if args.append else "w") as out:
        out.write(f"# smoke on {device}: backends {','.join(backends)}, dtypes {args.dtypes}, N {args.sizes}, "
                  f"temperatures {args.temperatures}, D = {args.dim}, {len(jobs) * per_job} cases, {workers} workers\n")
        out.flush()
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) if workers else None
        try:
            results = pool.imap_unordered(run_group, jobs) if pool else _in_process(jobs)
            while finished < len(jobs):
                left = args.time_box - (time.perf_counter() - started)
                if left <= 0:
                    raise multiprocessing.TimeoutError
                lines = results.next(timeout=left) if pool else next(results)
                finished += 1
                for line in lines:
                    counts[line.split()[0]] += 1
                    if line.startswith("n/a"):  # the text after the case's five fields: the reason
                        why = line.split(None, 6)[-1]
                        reasons[why[:150]] = reasons.get(why[:150], 0) + 1
                    print(line, flush=True)
                out.write("".join(line + "\n" for line in lines))
                out.flush()
        except multiprocessing.TimeoutError:
            interrupted = f"time box of {args.time_box:g} s"
        except KeyboardInterrupt:
            interrupted = "interrupted"
        finally:
            if pool:
                pool.terminate()
        not_run = (len(jobs) - finished) * per_job
        failed = counts["FAIL"] + counts["ERROR"]
        summary = (f"SUMMARY {','.join(backends)} on {device}: {len(jobs) * per_job} cases: {counts['PASS']} passed, "
                   f"{failed} failed, {counts['n/a']} n/a, {not_run} not run, {counts['SAT']} saturated"
                   f"{f' ({interrupted})' if interrupted else ''}; {time.perf_counter() - started:.0f} s")
        # Why cases were n/a, most frequent first: a backend that covers nothing shows up here at a glance.
        out.write("".join(f"# n/a x{k}: {why}\n" for why, k in sorted(reasons.items(), key=lambda x: -x[1])))
        out.write(summary + "\n")
    print(summary, flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
