"""Gather and ring modes on 2 and 3 CPU processes (gloo) against the single-process loss of the global batch.

Every rank checks: the returned loss equals the global loss, its per-sample gradients equal
world_size x their slice of the global gradient, and the average of the ranks' gradients of shared
tensors (temperature, logit scale, class centers, extra keys: what DDP computes) equals the global
gradient; float64, rel. error < 1e-9. Every loss in both modes, on every CPU backend.
"""
import datetime
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_contrastive as fc

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = {2: [5, 3], 3: [3, 1, 4]}  # uneven batches of the 8 samples


def global_problem():
    gen = torch.Generator().manual_seed(7)
    total = 8
    assert all(sum(split) == total for split in SPLITS.values())
    features = torch.nn.functional.normalize(torch.randn(total, 2, 6, dtype=torch.float64, generator=gen), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3, 9])  # uneven classes; class 1 and 3 only in one rank
    return features, labels


def assert_rel(actual, expected, what, scale=None):
    """Relative error; ``scale`` (the whole gradient's norm) when a slice of it may be exactly 0."""
    err = (actual - expected).norm() / max(float(expected.norm()), float(scale or 0), 1e-300)
    assert err < 1e-9, f"{what}: relative error {float(err):.3g}"


def run_rank(rank, world, init_file, check, backends, timeout_s=None):
    """One gloo process: this rank's slice [lo, hi) of the global problem, then ``check``."""
    sys.path.insert(0, HERE)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, **timeout)
    try:
        features, labels = global_problem()
        sizes = SPLITS[world]
        check(rank, world, sum(sizes[:rank]), sum(sizes[: rank + 1]), features, labels, backends)
        dist.barrier()  # gloo aborts a process whose peer tears down while it is still communicating
    finally:
        dist.destroy_process_group()


def spawn(check, world, timeout_s=None):
    """Run ``check`` on ``world`` gloo processes; ``timeout_s``: the group's timeout (a hang fails instead)."""
    from helpers import CPU_BACKENDS

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run_rank, args=(world, os.path.join(tmp, "init"), check, CPU_BACKENDS, timeout_s), nprocs=world,
                 join=True)


def check_supcon(rank, world, lo, hi, features, labels, backends):
    """SupCon in gather and ring modes: loss, features gradient (world x slice), temperature's DDP average."""
    for backend, layout in [(b, "gather") for b in backends] + [(b, "ring") for b in backends]:
        for mode in ("all", "one"):
            for use_labels in (True, False):
                for no_positive, variant in (("zero", "out"), ("exclude", "out"), ("zero", "in")):
                    y = labels if use_labels else None
                    kw = dict(contrast_mode=mode, no_positive=no_positive, base_temperature=0.1, backend=backend,
                              variant=variant)
                    tau_ref = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
                    f_ref = features.clone().requires_grad_()
                    ref = fc.supcon_loss(f_ref, y, temperature=tau_ref, **{**kw, "backend": "reference"})
                    ref_grad_f, ref_grad_tau = torch.autograd.grad(ref, (f_ref, tau_ref))

                    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
                    local = features[lo:hi].clone().requires_grad_()
                    local_labels = None if y is None else y[lo:hi]
                    loss = fc.supcon_loss(local, local_labels, temperature=tau, process_group=dist.group.WORLD,
                                          distributed=layout, **kw)
                    grad_f, grad_tau = torch.autograd.grad(loss, (local, tau))
                    what = f"rank {rank}/{world} {layout} {backend} {mode} labels={use_labels} {no_positive} {variant}"
                    assert_rel(loss.detach(), ref.detach(), what + " loss")
                    assert_rel(grad_f, world * ref_grad_f[lo:hi], what + " features grad")
                    dist.all_reduce(grad_tau)
                    assert_rel(grad_tau / world, ref_grad_tau, what + " temperature grad (DDP average)")


def family_cases(features, labels):
    """(name, loss(per-sample tensors..., **kw), per-sample tensors, shared tensors that get gradients)."""
    gen = torch.Generator().manual_seed(11)
    queue = torch.nn.functional.normalize(torch.randn(5, 6, dtype=torch.float64, generator=gen), dim=-1)
    centers = torch.nn.functional.normalize(torch.randn(10, 6, dtype=torch.float64, generator=gen), dim=-1)
    bank = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    bank_labels = torch.tensor([0, 2, 5, 9])
    scale = torch.tensor(7.0, dtype=torch.float64)
    tau = torch.tensor(0.3, dtype=torch.float64)
    views, pair = (features, labels), (features[:, 0], features[:, 1])
    views3 = torch.cat([features, features[:, :1].flip(0)], dim=1)  # a third view per sample
    universum = torch.nn.functional.normalize(torch.randn(features.shape, dtype=torch.float64, generator=gen), dim=-1)
    # Soft targets: side rows per sample as functions of the labels (a teacher embedding, class probabilities).
    teacher, teacher_queue = torch.randn(10, 4, dtype=torch.float64, generator=gen), torch.randn(5, 4, dtype=torch.float64,
                                                                                                  generator=gen)
    bank_probs = torch.softmax(torch.randn(4, 10, dtype=torch.float64, generator=gen), dim=1)
    probs = lambda y: 0.6 * torch.nn.functional.one_hot(y, 10).to(torch.float64) + 0.04  # noqa: E731
    scaled = (3 * features[:, 0], 0.5 * features[:, 1])  # not unit rows: normalize=True matters
    return [
        ("eps_supinfonce", lambda f, y, t, **kw: fc.eps_supinfonce_loss(f, y, epsilon=0.2, temperature=t,
                                                                       base_temperature=0.1, **kw), views, (tau,)),
        ("eps_one_extra_keys", lambda f, y, e, **kw: fc.eps_supinfonce_loss(
            f, y, contrast_mode="one", extra_keys=e, extra_key_labels=bank_labels, **kw), views, (bank,)),
        ("dcl", lambda f, t, **kw: fc.dcl_loss(f, temperature=t, **kw), (features,), (tau,)),
        ("dclw_queue", lambda f, **kw: fc.dcl_loss(f, temperature=0.3, weighted=True, extra_keys=queue, **kw),
         (features,), ()),
        ("info_nce_queue", lambda q, k, t, **kw: fc.info_nce(q, k, temperature=t, queue=queue, **kw), pair, (tau,)),
        ("moco_v2", lambda q, k, **kw: fc.info_nce(q, k, temperature=0.3, queue=queue, in_batch_negatives=False,
                                                   **kw), pair, ()),
        ("info_nce_symmetric", lambda q, k, **kw: fc.info_nce(q, k, symmetric=True, **kw), pair, ()),
        ("clip", lambda i, t, s, **kw: fc.clip_loss(i, t, s, **kw), pair, (scale,)),
        ("debiased", lambda f, t, **kw: fc.debiased_contrastive_loss(f, temperature=t, **kw), (features,), (tau,)),
        ("hard_negatives", lambda f, t, e, **kw: fc.debiased_contrastive_loss(f, temperature=t, beta=0.7,
                                                                              extra_keys=e, **kw),
         (features,), (tau, queue)),
        ("bcl_centers", lambda f, y, c, **kw: fc.bcl_loss(f, y, temperature=0.3, class_centers=c, **kw), views,
         (centers,)),
        ("spread", lambda f, y, **kw: fc.spread_loss(f, y, **kw), views, ()),
        ("spread_3views_bank", lambda f, y, e, **kw: fc.spread_loss(f, y, extra_keys=e, extra_key_labels=bank_labels,
                                                                    **kw), (views3, labels), (bank,)),
        ("symmetric_spread", lambda f, y, **kw: fc.symmetric_spread_loss(f, y, normalize=True, **kw),
         (views3, labels), ()),
        ("symmetric_spread_bank", lambda f, y, e, **kw: fc.symmetric_spread_loss(
            f, y, extra_keys=e, extra_key_labels=bank_labels, **kw), views, (bank,)),
        ("dcl_3views", lambda f, **kw: fc.dcl_loss(f, temperature=0.3, normalize=True, **kw), (views3,), ()),
        ("dclw_learned", lambda f, **kw: fc.dcl_loss(f, temperature=0.3, weighted=True, detach_weight=False, **kw),
         (features * 1.5,), ()),
        ("debiased_3views", lambda f, **kw: fc.debiased_contrastive_loss(f, beta=0.5, **kw), (views3,), ()),
        ("unicon", lambda f, u, y, **kw: fc.unicon_loss(f, u, y, temperature=0.3, **kw), (features, universum, labels),
         ()),
        ("eps_in", lambda f, y, **kw: fc.eps_supinfonce_loss(f, y, epsilon=0.3, form="in", **kw),
         (features, labels), ()),
        ("epsilon_supcon", lambda f, y, **kw: fc.epsilon_supcon_loss(f, y, epsilon=0.3, **kw), (features, labels), ()),
        ("paco", lambda f, y, c, **kw: fc.paco_loss(f, y, c, alpha=0.3, beta=0.8, gamma=0.5, supervised_temperature=0.7,
                                                   label_smoothing=0.1, extra_keys=bank, extra_key_labels=bank_labels,
                                                   contrast_mode="all", normalize=True, **kw), (features, labels),
         (centers,)),
        ("tsc", lambda q, k, y, **kw: fc.tsc_loss(q, k, y, queue=bank, queue_labels=bank_labels, targets=centers[:3],
                                                 target_labels=torch.tensor([0, 2, 9]), target_weight=0.4, **kw),
         (features[:, 0], features[:, 1], labels), ()),
        ("suncet_support", lambda f, y, s, **kw: fc.suncet_loss(f, y, support=s, support_labels=bank_labels, **kw),
         views, (bank,)),
        ("supcon_extra_keys", lambda f, y, e, **kw: fc.supcon_loss(f, y, extra_keys=e, extra_key_labels=bank_labels,
                                                                   **kw), views, (bank,)),
        ("info_nce_normalize", lambda q, k, **kw: fc.info_nce(q, k, normalize=True, **kw), scaled, ()),
        ("sce_queue", lambda q, k, t, **kw: fc.sce_loss(q, k, queue=queue, temperature=t, **kw), pair, (tau,)),
        ("sce_teacher_lam0", lambda q, k, y, **kw: fc.sce_loss(q, k, teacher[y], queue=queue, teacher_queue=teacher_queue,
                                                               lam=0.0, normalize=True, **kw), (*scaled, labels), ()),
        ("sce_lam1", lambda q, k, **kw: fc.sce_loss(q, k, lam=1.0, **kw), pair, ()),
        ("comatch_bank", lambda q, k, y, t, **kw: fc.comatch_loss(q, k, probs(y), bank=bank, bank_probs=bank_probs,
                                                                  threshold=0.1, temperature=t, **kw),
         (*pair, labels), (tau,)),
        ("comatch_self_loop", lambda q, k, y, **kw: fc.comatch_loss(q, k, probs(y), threshold=1.0, **kw), (*pair, labels),
         ()),
        ("supcon_in_extra_keys", lambda f, y, e, t, **kw: fc.supcon_loss(
            f, y, extra_keys=e, extra_key_labels=bank_labels, normalize=True, variant="in", temperature=t,
            no_positive="exclude", **kw), views, (bank, tau)),
    ]


# Triton's interpreter is slow: its ring mode on one case per row formula (L_out with a denominator bias and
# class centers, CLIP's two directions, L_in with extra keys, eps, debiased, hard negatives, soft targets).
TRITON_RING = ("bcl_centers", "clip", "supcon_in_extra_keys", "eps_supinfonce", "debiased", "hard_negatives",
               "sce_queue")
# Soft per-pair targets: on Triton where its kernels take them (gather mode; their ring only if in TRITON_RING).
SOFT_TARGETS = ("sce_queue", "sce_teacher_lam0", "sce_lam1", "comatch_bank", "comatch_self_loop")


def triton_runs_soft_targets() -> bool:
    try:
        fc.sce_loss(torch.eye(2, 4, dtype=torch.float64), torch.eye(2, 4, dtype=torch.float64), backend="triton")
    except RuntimeError:
        return False
    return True


# Ring mode through the common driver for what it once refused: several specs (spread, debiased with 3 views),
# terms added to the rows (SuNCEt's and eps form "in"'s constants, DCLW's learned weight, PaCo's center positives,
# TSC's positives), a third per-sample tensor (UniCon's universum), new row formulas (epsilon-SupCon, PaCo, TSC);
# each with the weighted reduction it is checked with on 2 ranks.
RING_NEW = {"spread": "mean", "spread_3views_bank": "none", "dclw_learned": "none", "debiased_3views": "sum",
            "unicon": "mean", "suncet_support": "none", "eps_in": "sum", "epsilon_supcon": "mean", "paco": "none",
            "tsc": "mean", "paco_one_offsets": "sum", "unicon_one": "none", "dclw_learned_normalized": "mean",
            "tsc_plain": "none", "eps_in_one": "mean"}


def ring_new_cases(features, labels):
    """More settings of the losses added to ring mode (as family_cases): contrast_mode="one", normalisation,
    a learned temperature through the terms added to the rows, PaCo's offsets, TSC with targets and no queue."""
    gen = torch.Generator().manual_seed(12)
    centers = torch.nn.functional.normalize(torch.randn(10, 6, dtype=torch.float64, generator=gen), dim=-1)
    offsets = torch.randn(10, dtype=torch.float64, generator=gen)
    universum = torch.randn(features.shape, dtype=torch.float64, generator=gen)
    tau = torch.tensor(0.3, dtype=torch.float64)
    return [
        ("paco_one_offsets", lambda f, y, c, **kw: fc.paco_loss(f, y, c, supervised_temperature=0.5, beta=0.5,
                                                               logit_offsets=offsets, **kw), (features, labels),
         (centers,)),
        ("unicon_one", lambda f, u, y, **kw: fc.unicon_loss(f, u, y, contrast_mode="one", normalize=True,
                                                           base_temperature=0.2, **kw), (features, universum, labels),
         ()),
        ("dclw_learned_normalized", lambda f, t, **kw: fc.dcl_loss(f, temperature=t, weighted=True, normalize=True,
                                                                   detach_weight=False, **kw), (features * 1.5,),
         (tau,)),
        ("tsc_plain", lambda q, k, y, t, **kw: fc.tsc_loss(q, k, y, targets=centers[:4], target_labels=[0, 1, 2, 3],
                                                           temperature=t, normalize=False, **kw),
         (features[:, 0], features[:, 1], labels), (tau,)),
        ("eps_in_one", lambda f, y, t, **kw: fc.eps_supinfonce_loss(f, y, form="in", temperature=t, contrast_mode="one",
                                                                    base_temperature=0.2, **kw), (features, labels),
         (tau,)),
    ]


# Triton's ring mode on the shapes the ring driver gained: anchors that are not the keys (UniCon's universum), a
# term carried by a gathered per-sample stat (PaCo's centers, TSC's positives with a zero positive weight), L_in
# with a per-class bias and a constant term (eps form "in"), several specs with a bank (spread).
TRITON_RING_NEW = ("unicon", "paco", "tsc", "eps_in", "spread_3views_bank")


def reduction_options(world, total):
    """The default mean, and on 2 ranks weighted "mean" / "sum" and "none" with per-sample weights (some 0);
    "none" is differentiated with a random per-row gradient."""
    weight = torch.rand(total, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    weight[::3] = 0
    if world != 2:
        return [{}]
    return [{}, dict(reduction="mean", weight=weight), dict(reduction="sum", weight=weight),
            dict(reduction="none", weight=weight)]


def check_family(rank, world, lo, hi, features, labels, backends):
    """Every loss in gather and ring mode: loss, per-sample gradients (world x slice), shared tensors' DDP
    average (temperature, logit scale, centers, extra keys), against the single-process loss of the global
    batch; with reductions and weights too."""
    soft_on_triton = "triton" in backends and triton_runs_soft_targets()
    for name, loss_fn, per_sample, shared in family_cases(features, labels):
        for options in reduction_options(world, len(labels)):
            full = [t.clone().requires_grad_(t.is_floating_point()) for t in per_sample]
            shared_ref = [t.clone().requires_grad_() for t in shared]
            ref = loss_fn(*full, *shared_ref, backend="reference", **options)
            upstream = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
            diff_inputs = [t for t in full if t.requires_grad] + shared_ref
            ref_grads = torch.autograd.grad((ref * upstream).sum(), diff_inputs)
            if options.get("reduction") == "none":  # this rank's rows
                ref, upstream = ref[lo:hi], upstream[lo:hi]
            for backend in backends:
                if backend == "triton" and name in SOFT_TARGETS and not soft_on_triton:
                    continue
                for mode in ("gather", "ring") if backend != "triton" or name in TRITON_RING else ("gather",):
                    local = [t[lo:hi].clone().requires_grad_(t.is_floating_point()) for t in per_sample]
                    shared_local = [t.clone().requires_grad_() for t in shared]
                    local_options = {k: v[lo:hi] if k == "weight" else v for k, v in options.items()}
                    if mode == "ring" and name in RING_NEW:  # their ring mode: check_ring_new
                        continue
                    loss = loss_fn(*local, *shared_local, backend=backend, process_group=dist.group.WORLD,
                                   distributed=mode, **local_options)
                    compare(rank, world, lo, hi, f"{name} {backend} {mode} {options.get('reduction', 'mean')}", loss,
                            local, shared_local, upstream, ref, ref_grads)


def compare(rank, world, lo, hi, what, loss, local, shared_local, upstream, ref, ref_grads):
    """This rank's loss and gradients against the global batch's (the loss times ``upstream``): the loss (this
    rank's rows for "none"), per-sample gradients world x their slice, shared tensors' DDP average."""
    grads = torch.autograd.grad((loss * upstream).sum(), [t for t in local if t.requires_grad] + shared_local)
    what = f"rank {rank}/{world} {what}"
    assert_rel(loss.detach(), ref.detach(), what + " loss")
    n_local = sum(t.requires_grad for t in local)
    for i, (g, e) in enumerate(zip(grads[:n_local], ref_grads[:n_local])):
        assert_rel(g, world * e[lo:hi], f"{what} grad {i}", scale=world * e.norm())
    for g, e in zip(grads[n_local:], ref_grads[n_local:]):
        dist.all_reduce(g)
        assert_rel(g / world, e, what + " shared grad (DDP average)")


def check_ring_new(rank, world, lo, hi, features, labels, backends):
    """The losses the ring driver once refused, in ring mode against the single-process loss (as check_family):
    the mean, and on 2 ranks one weighted reduction each (RING_NEW's), Triton on TRITON_RING_NEW. The global
    specs' features must stay placeholders (a ring build never writes [N, D] out)."""
    from fused_contrastive import distributed

    original, runs = distributed._run_ring, []

    def run_ring(spec, *args, **kwargs):
        assert spec.anchors.stride(0) == 0 and spec.keys.stride(0) == 0, "a ring build wrote its features out"
        runs.append(spec)
        return original(spec, *args, **kwargs)

    cases = [case for case in family_cases(features, labels) if case[0] in RING_NEW] + ring_new_cases(features, labels)
    assert sorted(case[0] for case in cases) == sorted(RING_NEW)
    weighted = {options["reduction"]: options for options in reduction_options(2, len(labels))[1:]}
    distributed._run_ring = run_ring
    try:
        for name, loss_fn, per_sample, shared in cases:
            for options in [{}] + ([weighted[RING_NEW[name]]] if world == 2 else []):
                full = [t.clone().requires_grad_(t.is_floating_point()) for t in per_sample]
                shared_ref = [t.clone().requires_grad_() for t in shared]
                ref = loss_fn(*full, *shared_ref, backend="reference", **options)
                upstream = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
                ref_grads = torch.autograd.grad((ref * upstream).sum(),
                                                [t for t in full if t.requires_grad] + shared_ref)
                if options.get("reduction") == "none":  # this rank's rows
                    ref, upstream = ref[lo:hi], upstream[lo:hi]
                for backend in backends:
                    if backend == "triton" and (name not in TRITON_RING_NEW or world != 2):
                        continue
                    local = [t[lo:hi].clone().requires_grad_(t.is_floating_point()) for t in per_sample]
                    shared_local = [t.clone().requires_grad_() for t in shared]
                    local_options = {k: v[lo:hi] if k == "weight" else v for k, v in options.items()}
                    loss = loss_fn(*local, *shared_local, backend=backend, process_group=dist.group.WORLD,
                                   distributed="ring", **local_options)
                    compare(rank, world, lo, hi, f"{name} {backend} ring {options.get('reduction', 'mean')}", loss,
                            local, shared_local, upstream, ref, ref_grads)
    finally:
        distributed._run_ring = original
    assert runs  # (the ring driver ran)


@pytest.mark.parametrize("world", [2, 3])
def test_ring_mode_of_the_once_refused_losses_is_exact(world):
    spawn(check_ring_new, world)


@pytest.mark.slow  # every loss x backend x mode (x reduction on 2 ranks): minutes on a loaded 2-core machine
@pytest.mark.parametrize("world", [2, 3])
def test_family_gather_and_ring_modes_are_exact(world):
    spawn(check_family, world)


@pytest.mark.parametrize("world", [2, 3])
def test_supcon_gather_and_ring_modes_are_exact(world):
    spawn(check_supcon, world)


def test_process_group_errors():
    features = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match="not initialised"):
        fc.supcon_loss(features, process_group=object())


def raised_together(what, call, world, *words, error=ValueError):
    """Run ``call`` on every rank: each must raise ``error`` with the same message, containing one of ``words``."""
    message = None
    try:
        call()
    except error as err:
        message = str(err)
    messages = [None] * world
    dist.all_gather_object(messages, message)
    assert messages[0] is not None and len(set(messages)) == 1, f"{what}: the ranks did not fail alike: {messages}"
    assert any(w in messages[0] for w in words), f"{what}: {messages[0]!r} names none of {words}"
    return messages[0]


def check_agreement(rank, world, lo, hi, features, labels, backends):
    """Bad input on one rank, or arguments that differ across ranks: every rank raises the same error (the
    group's short timeout turns a hang into a failure), and the group still works afterwards."""
    from test_bad_input import BAD_INPUTS, call_bad

    group, bad_rank = dist.group.WORLD, world - 1
    for name, loss, bad, word in BAD_INPUTS:  # every local check travels in the exchange
        if "local only" in name:
            continue
        check_finite = "(check on)" in name and rank == bad_rank  # the setting itself differs across ranks
        os.environ.update({"FUSED_CONTRASTIVE_CHECK_FINITE": "1"} if check_finite else {})
        try:
            mine_or_good = bad if rank == bad_rank else {}
            message = raised_together(name, lambda: call_bad(loss, mine_or_good, process_group=group),
                                      world, word, *(f"disagree on {k}" for k in bad))
        finally:
            os.environ.pop("FUSED_CONTRASTIVE_CHECK_FINITE", None)
        assert f"rank {bad_rank}" in message or "disagree" in message, f"{name}: {message}"

    f, y = features[lo:hi], labels[lo:hi]
    mine = (lambda a, b: b) if rank == bad_rank else (lambda a, b: a)  # the other ranks' value, then this one's
    both, gather = ("gather", "ring"), ("gather",)
    differ = [  # (what differs, call, the argument the error must name, distributed modes)
        ("features dtype", lambda **kw: fc.supcon_loss(mine(f, f.float()), y, **kw), "features", both),
        ("labels int64 / int32", lambda **kw: fc.supcon_loss(f, mine(y, y.int()), **kw), "labels", both),
        ("labels int64 / float64", lambda **kw: fc.supcon_loss(f, mine(y, y.double()), **kw), "labels", both),
        ("labels on one rank only", lambda **kw: fc.supcon_loss(f, mine(y, None), **kw), "labels", both),
        ("temperature", lambda **kw: fc.supcon_loss(f, y, temperature=mine(0.1, 0.5), **kw), "temperature", both),
        ("contrast_mode", lambda **kw: fc.supcon_loss(f, y, contrast_mode=mine("all", "one"), **kw), "contrast_mode",
         both),
        ("features requires grad", lambda **kw: fc.supcon_loss(f.clone().requires_grad_(rank != bad_rank), y, **kw),
         "features", both),
        ("empty local batch", lambda **kw: fc.supcon_loss(mine(f, f[:0]), mine(y, y[:0]), **kw),
         f"rank {bad_rank} of the process group ({world} ranks): features must have at least one sample", both),
        ("gather / ring", lambda **kw: fc.supcon_loss(f, y, distributed=mine("gather", "ring"), **kw), "distributed",
         gather),
        ("clip gather / ring", lambda **kw: fc.clip_loss(f[:, 0], f[:, 1], 10.0, distributed=mine("gather", "ring"),
                                                         **kw), "distributed", gather),
        ("logit_scale", lambda **kw: fc.clip_loss(f[:, 0], f[:, 1], mine(10.0, 20.0), **kw), "logit_scale", both),
        ("bcl labels", lambda **kw: fc.bcl_loss(f, mine(y, y.float()), **kw), "labels", both),
        ("dcl weighted", lambda **kw: fc.dcl_loss(f, weighted=mine(False, True), **kw), "weighted", both),
    ]
    for what, call, word, modes in differ:
        for mode in modes:
            kw = dict(process_group=group) if mode == "gather" else dict(process_group=group, distributed="ring")
            raised_together(f"{what} ({mode})", lambda: call(**kw), world, word)

    # Any other exception before the exchange: that rank re-raises it, the others name it.
    from fused_contrastive import losses

    def broken(*_):
        raise RuntimeError("injected failure")

    original = losses._flatten_views
    if rank == bad_rank:
        losses._flatten_views = broken
    try:
        with pytest.raises(RuntimeError, match="injected failure") as err:
            fc.supcon_loss(f, y, process_group=group)
        assert rank == bad_rank or f"rank {bad_rank}" in str(err.value), str(err.value)
    finally:
        losses._flatten_views = original

    # A group without this rank is an error here; its members compute without it.
    solo = dist.new_group([0])
    if rank == 0:
        assert_rel(fc.supcon_loss(f, y, process_group=solo), fc.supcon_loss(f, y), "group of rank 0 alone")
    else:
        with pytest.raises(ValueError, match="process_group does not include this process"):
            fc.supcon_loss(f, y, process_group=solo)

    # One comparison rule in both modes: int8 labels against an extra label 256 (no sample has it) and a
    # float one; then the group still computes the global loss exactly.
    bank = torch.nn.functional.normalize(torch.randn(3, 6, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(3)), dim=-1)
    expected = fc.supcon_loss(features, labels, extra_keys=bank, extra_key_labels=[1000, 2, 1001], backend="reference")
    for mode in ("gather", "ring"):
        got = fc.supcon_loss(f, y.to(torch.int8), extra_keys=bank, extra_key_labels=torch.tensor([256, 2, 0.5]),
                             process_group=group, distributed=mode, backend="reference")
        assert_rel(got, expected, f"{mode} with promoted extra labels")


def test_ranks_agree_or_fail_together():
    spawn(check_agreement, 2, timeout_s=300)  # a hang fails; 60 s aborted a rank once on a loaded machine


def test_ring_build_keeps_extra_keys_apart():
    """Ring mode builds the global spec on zero-stride placeholder features: appending extra keys (a bank, a
    queue) must not write the placeholder out as a [views N + E, D] buffer; the extra keys go to the driver."""
    from fused_contrastive import distributed, family, losses

    features = distributed._placeholder(torch.zeros(1, 2, 6, dtype=torch.float64), 1000)
    bank = torch.randn(4, 6, dtype=torch.float64)
    labels = torch.arange(1000) % 7
    spec, extra = distributed._build_on_placeholders(
        lambda f, y: losses.supcon_spec(f, y, extra_keys=bank, extra_key_labels=torch.arange(4)), features, labels)
    assert extra is bank and spec.num_keys == 2004 and spec.keys.stride() == (0, 0)
    spec, extra = distributed._build_on_placeholders(
        lambda q, k: family._info_nce_spec(q, k, 0.1, bank, True), features[:, 0], features[:, 1])
    assert torch.equal(extra, bank) and spec.num_keys == 1004 and spec.keys.stride() == (0, 0)
    assert distributed.append_keys(bank, bank).shape == (8, 6)  # outside ring mode: a plain concatenation
