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
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import timing  # noqa: E402  (bench/timing.py: how every benchmark here times)
NUM_CLASSES = 100
TEMPERATURE = 0.1
BANK_ROWS = 65536  # the memory bank of bench/family.py's supcon_memory_bank case (a MoCo-sized queue)


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


def _soft_probs(labels):
    """Pseudo-label probabilities [n, NUM_CLASSES] for CoMatch: 0.7 on the label, the rest spread evenly."""
    import torch

    one_hot = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
    return 0.7 * one_hot + 0.3 * (1 - one_hot) / (NUM_CLASSES - 1)


def family_loss(loss, backend):
    """One of the family's losses as (features [bsz, 2, D], labels [bsz]) -> loss, on ``backend``, with N x N
    logits for every loss (N = 2 bsz rows): the pair losses (InfoNCE, CLIP) pair each of the N rows with its
    other view; the MoCo queue and the labelled extra keys hold bsz more rows (no gradient); BCL adds one
    center per class; unicon's universum is N fixed rows (its keys); supcon_memory_bank is SupCon through MemoryBankLoss with a full bank of BANK_ROWS labelled
    keys (each call reads the bank, then enqueues the batch's views)."""
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

    def memory_bank(f, rows=BANK_ROWS):  # a MemoryBankLoss whose bank is full: each call reads it, then enqueues
        if "memory" not in bank:
            gen = torch.Generator().manual_seed(2)
            memory = fc.MemoryBankLoss(fc.supcon_loss, rows, f.shape[-1], dtype=f.dtype, temperature=t,
                                       backend=backend).to(f.device)
            keys = torch.nn.functional.normalize(torch.randn(rows, f.shape[-1], generator=gen), dim=-1)
            memory.bank.enqueue(keys.to(device=f.device, dtype=f.dtype),
                                torch.randint(0, NUM_CLASSES, (rows,), generator=gen).to(f.device))
            bank["memory"] = memory
        return bank["memory"]

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
        "supcon_memory_bank": lambda f, y: memory_bank(f)(f, y),
        "eps_supinfonce": lambda f, y: fc.eps_supinfonce_loss(f, y, temperature=t, backend=backend),
        "dcl": lambda f, y: fc.dcl_loss(f, temperature=t, backend=backend),
        "dclw": lambda f, y: fc.dcl_loss(f, temperature=t, weighted=True, backend=backend),
        "info_nce": lambda f, y: fc.info_nce(*pairs(f), temperature=t, backend=backend),
        "info_nce_queue": lambda f, y: fc.info_nce(*pairs(f), temperature=t, backend=backend,
                                                   queue=fixed(f, f.shape[0])["keys"]),
        "clip": lambda f, y: fc.clip_loss(*pairs(f), 1.0 / t, backend=backend),
        "debiased": lambda f, y: fc.debiased_contrastive_loss(f, temperature=0.5, beta=1.0, backend=backend),
        "bcl": lambda f, y: fc.bcl_loss(f, y, temperature=t, class_centers=fixed(f, 1)["centers"], backend=backend),
        "spread": lambda f, y: fc.spread_loss(f, y, temperature=0.5, backend=backend),  # bsz x bsz: view 1 vs 0
        "symmetric_spread": lambda f, y: fc.symmetric_spread_loss(f, y, temperature=0.5, backend=backend),
        "dclw_learned": lambda f, y: fc.dcl_loss(f, temperature=t, weighted=True, detach_weight=False,
                                                 backend=backend),
        "unicon": lambda f, y: fc.unicon_loss(f, fixed(f, f.shape[0] * f.shape[1])["keys"], y, temperature=t,
                                              backend=backend),  # universum: N rows (no gradient here)
        "suncet": lambda f, y: fc.suncet_loss(f, y, temperature=t, backend=backend),
        "eps_supinfonce_in": lambda f, y: fc.eps_supinfonce_loss(f, y, form="in", temperature=t, backend=backend),
        "epsilon_supcon": lambda f, y: fc.epsilon_supcon_loss(f, y, epsilon=0.25, temperature=t, backend=backend),
        # FairKL: a bias label independent of the class (every sample index mod 3), so all four groups have pairs;
        # fairkl_regularizer alone (not in bench/family.py's default list) for its memory and time.
        "fairkl": lambda f, y: fc.fairkl_loss(f, y, torch.arange(y.shape[0], device=y.device) % 3, temperature=t,
                                              backend=backend),
        "fairkl_regularizer": lambda f, y: fc.fairkl_regularizer(f, y, torch.arange(y.shape[0], device=y.device) % 3,
                                                                 backend=backend),
        # PaCo: a labelled queue of N rows, learnable centers, GPaCo's settings away from 1.
        "paco": lambda f, y: fc.paco_loss(f, y, fixed(f, f.shape[0])["centers"], alpha=0.05, gamma=0.5,
                                          supervised_temperature=1.0, label_smoothing=0.1, temperature=t,
                                          extra_keys=fixed(f, f.shape[0])["keys"],
                                          extra_key_labels=fixed(f, f.shape[0])["labels"], backend=backend),
        # TSC: view 0 as query, view 1 as key, an N-row labelled queue, the centers as class targets.
        "tsc": lambda f, y: fc.tsc_loss(f[:, 0], f[:, 1], y, queue=fixed(f, f.shape[0])["keys"],
                                        queue_labels=fixed(f, f.shape[0])["labels"],
                                        targets=fixed(f, f.shape[0])["centers"].detach(),
                                        target_labels=torch.arange(NUM_CLASSES, device=f.device),
                                        target_weight=0.5, temperature=t, backend=backend),
        # Soft targets: the pairs against N fixed queue / bank rows; SCE's teacher is the key (the default),
        # CoMatch's probabilities a smoothed one-hot of the labels (the bank's from its labels).
        "sce": lambda f, y: fc.sce_loss(*pairs(f), queue=fixed(f, f.shape[0] * f.shape[1])["keys"], temperature=t,
                                        backend=backend),
        "comatch": lambda f, y: fc.comatch_loss(*pairs(f), _soft_probs(torch.cat([y, y])),
                                                bank=fixed(f, f.shape[0] * f.shape[1])["keys"],
                                                bank_probs=_soft_probs(fixed(f, f.shape[0] * f.shape[1])["labels"]),
                                                temperature=0.2, threshold=0.5, backend=backend),
        # RényiCL: the views as sources, their detached copies as the targets; CACR: the two views.
        "renyicl": lambda f, y: fc.renyicl_loss(f, f.detach(), backend=backend),
        "cacr": lambda f, y: fc.cacr_loss(f, backend=backend),
        # SigLIP with a learnable scale and bias (open_clip's initial values), as bench/siglip.py times it.
        "siglip": lambda f, y: fc.siglip_loss(*pairs(f), *_siglip_scale_bias(f), backend=backend),
    }
    return losses[loss]


def _siglip_scale_bias(f):
    import torch

    return (torch.tensor(10.0, device=f.device, requires_grad=True),
            torch.tensor(-10.0, device=f.device, requires_grad=True))


def open_clip_siglip():
    """open_clip's SigLipLoss (its loss.py by file path: tests/helpers.py) on the rows family_loss("siglip")
    builds, with the same scale and bias: the same loss as siglip:<backend>."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import open_clip_loss_module

    module = open_clip_loss_module()
    if module is None:
        raise ImportError("open_clip's loss.py is not available (.compat_libs/ not carried or not installed by make setup)")
    loss = module.SigLipLoss()

    def run(f, y):
        import torch

        return loss(torch.cat([f[:, 0], f[:, 1]]), torch.cat([f[:, 1], f[:, 0]]), *_siglip_scale_bias(f))

    return run


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
    if name in CLIP_PROVIDERS:
        return clip_provider(name)
    if name == "open_clip-siglip":
        return open_clip_siglip()
    raise ValueError(name)


# CLIP (both directions, mean) from other packages, on the rows that family_loss("clip") builds from the
# two views, with logit scale 1 / TEMPERATURE: the same loss as clip:<backend>.
CLIP_PROVIDERS = {"infcl-clip": ("inf_cl", "inf-cl==1.2.1"), "memeff-clip": ("memeff", "memeff==0.3.1")}


def clip_provider(name):
    import torch

    def pairs(f):
        return torch.cat([f[:, 0], f[:, 1]]), torch.cat([f[:, 1], f[:, 0]])

    if name == "infcl-clip":
        # cal_inf_loss is one direction (rows of its first argument); its own CLIP recipe averages both.
        # It upcasts its inputs to fp32 itself.
        from inf_cl import cal_inf_loss

        def run(f, y):
            image, text = pairs(f)
            head = min(256, image.shape[1])  # it splits D into heads of this width (16 to 256), summed
            return 0.5 * (cal_inf_loss(image, text, scale=1.0 / TEMPERATURE, head_dim=head)
                          + cal_inf_loss(text, image, scale=1.0 / TEMPERATURE, head_dim=head))

        return run
    # memeff: its own L2 normalisation off (the rows are unit already) and the textbook gradient scale
    # (stable=False), so that loss and gradients are those of the other providers.
    from memeff import MemoryEfficientCLIPLoss

    memeff = MemoryEfficientCLIPLoss(temperature=TEMPERATURE, normalized_inputs=True, stable=False)
    return lambda f, y: memeff(*pairs(f))


    raise ValueError(name)


def provider_skip_reason(name, device):
    """Why ``name`` cannot run on ``device`` here (None: it can). Asks only the backend named, so that asking
    about triton never builds the CUDA extension."""
    import importlib.util

    import torch

    if name in ("chunked", "reference", "triton", "cuda") or ":" in name:
        from fused_contrastive import dispatch
        from fused_contrastive.losses import supcon_spec

        backend = name.split(":")[-1]
        probe = torch.zeros(4, 2, 8, device=device)
        return dispatch.BACKENDS[backend].why_not(supcon_spec(probe, torch.arange(4, device=device)))
    if name == "open_clip-siglip":
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from helpers import open_clip_loss_module

        if open_clip_loss_module() is None:
            return "open_clip's loss.py is not available (carry .compat_libs, which make setup fills)"
        return None
    if name == "pml" and importlib.util.find_spec("pytorch_metric_learning") is None:
        return "pytorch-metric-learning is not installed (pip install pytorch-metric-learning)"
    if name == "supcontrast-compiled" and device == "cpu":
        return "torch.compile is measured on GPU only"
    if name == "infcl" or name in CLIP_PROVIDERS:
        module, pin = CLIP_PROVIDERS.get(name, ("inf_cl", "inf-cl==1.2.1"))
        if importlib.util.find_spec(module) is None:
            return f"{pin} is not installed (not carried: bench/gpu_suite.sh installs it from .whl/ when there)"
        if device == "cpu":
            return f"{module} runs on CUDA devices only"
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


class RssSampler:
    """The largest VmRSS seen every 5 ms by a thread: a second reading of the peak beside VmHWM, which once read
    a tenth of open_clip's measured 5 GB at N = 16384 on this machine (a reset of the high-water mark that did
    not hold, or pages not yet counted); the larger of the two is reported."""

    def __init__(self):
        import threading

        self.peak, self.running = _proc_status_bytes("VmRSS"), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            self.peak = max(self.peak, _proc_status_bytes("VmRSS"))
            time.sleep(0.005)

    def stop(self):
        self.running = False
        self.thread.join()
        return self.peak


def measure_case(step, *, cuda: bool, budget_s: float, max_reps: int, warm_up=None):
    """One benchmark case's numbers from ``step() -> (loss, tensors)``: the first call's peak memory beyond
    what is allocated before it (torch.cuda.max_memory_allocated on a GPU; on CPU the larger of VmHWM and a
    5 ms VmRSS sampler) and its fwd/bwd time, then bench/timing.py's repeats. ``warm_up()``: a call made
    before measuring (on CPU, a tiny batch: imports and first-call setup out of the peak); on a GPU two full
    steps (compilation and Triton's autotuning) are made instead."""
    import torch

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:  # compilation and Triton's autotuning happen on the first calls: keep them out of time and memory
        for _ in range(2):
            step()[0].backward()
    elif warm_up is not None:
        warm_up()
    sync()
    sampler = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _proc_status_bytes("VmRSS")
        sampler = RssSampler()
    t0 = time.perf_counter()
    loss, _ = step()  # the peak-memory measurement, and the only timing when one call is already long
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    first = (t1 - t0, time.perf_counter() - t1)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(_proc_status_bytes("VmHWM"), sampler.stop()) - base
    first_loss = float(loss.detach().float())
    del loss
    result = timing.measure(step, cuda=cuda, budget_s=budget_s, first=first, max_reps=max_reps)
    return {"fwd_s": result["fwd"]["median"], "bwd_s": result["bwd"]["median"],
            "fwd_bwd_s": result["fwd_bwd"]["median"], "fwd_bwd_min_s": result["fwd_bwd"]["min"],
            "noise": timing.noise(result["fwd_bwd"]), "reps": result["fwd_bwd"]["n"],
            "fwd": result["fwd"], "bwd": result["bwd"], "fwd_bwd": result["fwd_bwd"],
            "loss_value": result["loss"] if result["loss"] is not None else first_loss,
            "peak_extra_bytes": max(peak, 0)}


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

    def step():
        f = features.detach().requires_grad_()
        return fn(f, labels), (f,)

    # Many repeats of short GPU calls cost little; on CPU a handful keeps `make bench` to minutes.
    return measure_case(step, cuda=cuda, budget_s=budget_s, max_reps=50 if cuda else 7)


def gemm_rate(device, m=8192, k=128, n=None, dtype=None):
    """torch.matmul rate in FLOP/s of [m, k] x [k, n] (default: the loss's own product [8192, 128] x [128,
    8192]) on random data, bf16 on a GPU and fp32 on CPU unless ``dtype``: (median rate, dtype name,
    timing summary). On a GPU triton.testing.do_bench times it (CUDA events, quantiles)."""
    import torch

    n = m if n is None else n
    gpu = device.startswith("cuda")
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    if gpu:
        import triton.testing

        q20, med, q80, lo = triton.testing.do_bench(lambda: a @ b, quantiles=[0.2, 0.5, 0.8, 0.0])
        stats = {"n": None, "min": lo / 1e3, "median": med / 1e3, "q20": q20 / 1e3, "q80": q80 / 1e3}
    else:
        a @ b
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        stats = timing.summary(times)
    return 2 * m * n * k / stats["median"], str(dtype).replace("torch.", ""), stats


# ---------------------------------------------------------------- the driver
def environment(device):
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timer": "cuda" if device.startswith("cuda") else "host",
        "python": platform.python_version(),
        "load_average": timing.load_average(),
        "cpu_count": os.cpu_count(),
    }
    for dist in ("triton", "pytorch-metric-learning", "fused_contrastive", "inf-cl", "memeff"):
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


fmt_time = timing.fmt_time


def fmt_noise(r):
    return "-" if r.get("noise") is None else f"±{50 * r['noise']:.0f}%"


def markdown(rows, env, baseline):
    lines = [f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · "
             f"commit {env['git_commit']} · {env['date']} · load average {env.get('load_average')}", "",
             f"SupCon (L_out, 'all', 2 views, temperature {TEMPERATURE}). fwd (with autograd recording) and bwd "
             f"timed separately in each repeat ({'CUDA events' if env.get('timer') == 'cuda' else 'host clock'}); "
             "medians over the repeats (reps), `min` the fastest fwd+bwd, `noise` half the 20-80% quantile "
             "spread of fwd+bwd over its median (differences inside it are noise); "
             f"peak memory beyond the inputs; ratios of median fwd+bwd time and peak memory against `{baseline}` in the "
             f"same run; GEMM rate: torch.matmul {env.get('gemm_dtype')} at {env.get('gemm_flops', 0) / 1e12:.3f} TFLOP/s.",
             "",
             "| provider | N | D | dtype | fwd | bwd | fwd+bwd | min | noise | reps | peak extra memory | time vs "
             + baseline + " | memory vs " + baseline + " | TFLOP/s (6N²D) | of GEMM rate | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tflops = f"{r['tflops']:.3f}" if "tflops" in r else "-"
        frac = f"{100 * r['fraction_of_gemm']:.0f}%" if "fraction_of_gemm" in r else "-"
        lines.append(f"| {r['provider']} | {r['n']} | {r['dim']} | {r['dtype']} | {fmt_time(r.get('fwd_s'))} | "
                     f"{fmt_time(r.get('bwd_s'))} | {fmt_time(r.get('fwd_bwd_s'))} | {fmt_time(r.get('fwd_bwd_min_s'))} | "
                     f"{fmt_noise(r)} | {r.get('reps', '-')} | {fmt_bytes(r.get('peak_extra_bytes'))} | "
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
    rate, rate_dtype, _ = gemm_rate(device)
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
    env["load_average_end"] = timing.load_average()

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
