"""How every benchmark here times a loss: forward and backward separately, several repeats, min and median.

One repeat = one forward with autograd recording (what a training step pays) then its backward, each
timed on its own: CUDA events around each on a GPU (the device's own clock, no host synchronisation
between the two), ``time.perf_counter`` on CPU. bwd is measured, never derived as total - fwd. The
noise band is the spread between the 20% and 80% quantiles of the fwd+bwd repeats, over their median;
a difference between two providers smaller than their bands is noise.
"""
from __future__ import annotations

import os
import statistics
import time


def load_average():
    """The 1-, 5- and 15-minute load averages (None where the OS has none): a busy machine slows CPU timings
    and launch-bound GPU timings alike, so every result records it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def summary(samples):
    """{n, min, median, q20, q80} of a list of seconds (quantiles interpolated; with one sample all equal)."""
    xs = sorted(samples)
    if not xs:
        return None

    def quantile(q):
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"n": len(xs), "min": xs[0], "median": statistics.median(xs), "q20": quantile(0.2), "q80": quantile(0.8)}


def noise(stats):
    """(q80 - q20) / median of a summary, or None with fewer than 3 repeats (no band to speak of)."""
    if not stats or stats["n"] < 3 or stats["median"] <= 0:
        return None
    return (stats["q80"] - stats["q20"]) / stats["median"]


def measure(step, *, cuda, budget_s, min_reps=3, max_reps=50, first=None):
    """Time ``step()`` -> (loss, tensors whose .grad to clear) split into forward and backward.

    ``step`` builds the loss (the timed forward); this function calls ``loss.backward()`` (the timed
    backward). Repeats until ``max_reps``, or until ``budget_s`` is spent with at least ``min_reps``; fewer
    only when one repeat alone takes over half the budget. ``first``: a (fwd_s, bwd_s) sample already
    taken (a warm-up), kept as the only one when it alone was over half the budget. Returns
    {"fwd", "bwd", "fwd_bwd": summaries, "loss": the last loss as a float}.
    """
    import torch

    fwd, bwd = [], []
    if first is not None and sum(first) > budget_s / 2:
        fwd, bwd = [first[0]], [first[1]]
    loss_value = None
    started = time.perf_counter()
    while len(fwd) < max_reps:
        spent = time.perf_counter() - started
        if fwd and (len(fwd) >= min_reps and spent >= budget_s or sum(fwd + bwd) / len(fwd) > budget_s / 2):
            break
        if cuda:
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            loss, tensors = step()
            e1.record()
            loss.backward()
            e2.record()
            # One synchronisation per repeat, outside the timed regions: the host's clock above then
            # tracks the device's, so the budget holds for long calls too.
            torch.cuda.synchronize()
            fwd.append(e0.elapsed_time(e1) / 1e3)
            bwd.append(e1.elapsed_time(e2) / 1e3)
        else:
            t0 = time.perf_counter()
            loss, tensors = step()
            t1 = time.perf_counter()
            loss.backward()
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        for t in tensors:
            t.grad = None
        loss_value = float(loss.detach().float())
    return {"fwd": summary(fwd), "bwd": summary(bwd), "fwd_bwd": summary([f + b for f, b in zip(fwd, bwd)]),
            "loss": loss_value}


def fmt_time(t):
    return "-" if t is None else (f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.2f} ms" if t < 0.1 else f"{t * 1e3:.1f} ms")


def fmt_stats(stats):
    """'median (min x, ±band%, n reps)' for a markdown cell."""
    if not stats:
        return "-"
    band = noise(stats)
    extra = f", ±{100 * band / 2:.0f}%" if band is not None else ""
    return f"{fmt_time(stats['median'])} (min {fmt_time(stats['min'])}{extra}, n={stats['n']})"
