"""fused_contrastive.compat against the real libraries, float64: loss and every gradient (helpers.assert_close).

pytorch-metric-learning is a test dependency. open_clip and lightly would pull another torch, so `make setup`
installs their wheels without dependencies into .compat_libs/, and only their loss modules are loaded from
there (lightly's package __init__ files, which import torchvision, are bypassed); these cases skip, saying
so, where .compat_libs/ is absent.
"""
import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.distributed as dist

from fused_contrastive.compat import lightly as our_lightly
from fused_contrastive.compat import open_clip as our_open_clip
from fused_contrastive.compat import pml as our_pml
from helpers import COMPAT_LIBS, CPU_BACKENDS, assert_close, open_clip_loss_module

LIBS = COMPAT_LIBS
F64 = torch.float64
# Triton (under its interpreter here) on the small cases only: it runs each tile op in numpy.
BACKENDS = CPU_BACKENDS


def small_or_skip(backend: str, rows: int) -> None:
    if backend == "triton" and rows > 16:
        pytest.skip("Triton's CPU interpreter: small cases only (test_gpu.py runs it at size)")


def _need(path: str) -> str:
    path = os.path.join(LIBS, path)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (make setup installs open_clip and lightly there without dependencies)")
    return path


def open_clip_loss():
    """open_clip's loss.py alone (it imports torch only)."""
    module = open_clip_loss_module()
    if module is None:
        _need("open_clip/loss.py")  # skips, saying where make setup puts it
    return module


def lightly_losses():
    """lightly's NTXentLoss / DCLLoss modules, with its package __init__ files bypassed (they import
    torchvision) and models.utils reduced to the one function the memory bank uses."""
    root = _need("lightly")
    if "lightly.loss.ntx_ent_loss" not in sys.modules:
        for name in ("lightly", "lightly.utils", "lightly.models", "lightly.models.modules", "lightly.loss"):
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, *name.split(".")[1:])]
            sys.modules[name] = package
        utils = types.ModuleType("lightly.models.utils")

        def concat_all_gather(x):
            out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(out, x)
            return torch.cat(out)

        utils.concat_all_gather = concat_all_gather
        sys.modules["lightly.models.utils"] = sys.modules["lightly.models"].utils = utils
    return (importlib.import_module("lightly.loss.ntx_ent_loss"), importlib.import_module("lightly.loss.dcl_loss"))


def rand(*shape, seed=0, grad=True):
    x = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


def compare(ours, theirs, inputs, what):
    """Loss and the gradient of every input that requires grad, ours against theirs."""
    assert_close(ours.detach().reshape(()), theirs.detach().reshape(()).to(F64), F64, what + " loss")
    need = [x for x in inputs if x.requires_grad]
    g_ours = torch.autograd.grad(ours, need, allow_unused=True, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, need, allow_unused=True, retain_graph=True)
    for i, (a, b) in enumerate(zip(g_ours, g_theirs)):
        a = torch.zeros_like(need[i]) if a is None else a
        b = torch.zeros_like(need[i]) if b is None else b
        assert_close(a, b, F64, f"{what} grad {i}")


# ----------------------------------------------------------------------------- pytorch-metric-learning

PML_CASES = {  # name: (N, labels kind, ref rows or None)
    "n1": (1, "random", None), "n2_same": (2, "same", None), "n3": (3, "random", None),
    "n129": (129, "random", None), "single_class": (9, "same", None), "no_positives": (7, "distinct", None),
    "ref_emb": (10, "random", 13), "ref_is_labels": (10, "random", "identity"), "ref_one_row": (5, "random", 1),
}


def pml_labels(kind, n, seed=1):
    if kind == "same":
        return torch.full((n,), 3)
    if kind == "distinct":
        return torch.arange(n) * 2
    return torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["SupConLoss", "NTXentLoss"])
@pytest.mark.parametrize("case", list(PML_CASES))
def test_pml_losses_match_pml(case, name, backend):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    n, kind, ref = PML_CASES[case]
    small_or_skip(backend, n)
    x, y = rand(n, 5, seed=n), pml_labels(kind, n)
    kwargs, inputs = {}, [x]
    if ref == "identity":  # ref_labels *is* labels: pml drops the (i, i) pairs
        kwargs = dict(ref_emb=rand(n, 5, seed=99), ref_labels=y)
    elif ref is not None:
        kwargs = dict(ref_emb=rand(ref, 5, seed=99), ref_labels=pml_labels(kind, ref, seed=5))
    inputs += [kwargs["ref_emb"]] if kwargs else []
    tau = 0.2 if name == "SupConLoss" else 0.3
    ours = getattr(our_pml, name)(tau, backend=backend)(x, y, **kwargs)
    theirs = getattr(losses, name)(tau)(x, y, **kwargs)
    compare(ours, theirs, inputs, f"{name} {case}")


def test_pml_defaults_and_refusals():
    import inspect

    losses = pytest.importorskip("pytorch_metric_learning.losses")
    for name in ("SupConLoss", "NTXentLoss"):
        assert getattr(our_pml, name)().temperature == getattr(losses, name)().temperature
        assert list(inspect.signature(getattr(our_pml, name).forward).parameters) == \
            list(inspect.signature(getattr(losses, name).forward).parameters)
    x, y = rand(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    for call, word in [(lambda: our_pml.SupConLoss()(x, y, indices_tuple=(y, y, y)), "indices_tuple"),
                       (lambda: our_pml.NTXentLoss()(x), "labels"),
                       (lambda: our_pml.SupConLoss()(x, y, ref_emb=x), "ref_labels"),
                       (lambda: our_pml.SupConLoss(reducer=object()), "reducer"),
                       (lambda: our_pml.SupConLoss(0.0), "temperature"),
                       (lambda: our_pml.CrossBatchMemory(our_pml.SupConLoss(), 4, miner=object()), "miner"),
                       (lambda: our_pml.CrossBatchMemory(torch.nn.MSELoss(), 4), "loss")]:
        with pytest.raises(ValueError, match=word):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["SupConLoss", "NTXentLoss"])
def test_cross_batch_memory_matches_pml(name, backend):
    """Several steps through a memory of 10: filling, wrapping around (FIFO), a batch with enqueue_mask;
    loss, gradients and the memory's rows against pml's CrossBatchMemory."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    ours = our_pml.CrossBatchMemory(getattr(our_pml, name)(0.25, backend=backend), 5, memory_size=10)
    theirs = losses.CrossBatchMemory(getattr(losses, name)(0.25), 5, memory_size=10)
    # No batch of one row: pml then keeps the anchor's own copy as a positive (its self-comparison filter
    # takes a one-row batch for a wrapped one), which this class does not copy (module docstring).
    for step, n in enumerate([4, 4, 2, 4, 10, 3, 6]):
        x, y = rand(n, 5, seed=10 + step), pml_labels("random", n, seed=step)
        mask = (torch.arange(n) % 2 == 0) if step == 5 else None
        compare(ours(x, y, enqueue_mask=mask), theirs(x, y, enqueue_mask=mask), [x], f"{name} step {step}")
        filled = len(ours.bank)
        assert filled == (10 if theirs.has_been_filled else theirs.queue_idx)
        assert torch.equal(ours.bank.keys[:filled], theirs.embedding_memory[:filled])
        assert torch.equal(ours.bank.labels[:filled], theirs.label_memory[:filled])


# ----------------------------------------------------------------------------- open_clip

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2, 3, 129])
@pytest.mark.parametrize("bias", [None, -2.5])
def test_clip_loss_matches_open_clip(batch, bias, backend):
    reference = open_clip_loss().ClipLoss()
    # Unit rows, as CLIP models give (raw rows of norm ~2.4 at scale 7.5 make the gradient a cancellation of
    # near-one-hot softmaxes, where two float64 evaluations differ by more than the table allows).
    unit = [torch.nn.functional.normalize(rand(batch, 6, seed=batch + i, grad=False), dim=1) for i in (0, 1)]
    image, text = (u.requires_grad_() for u in unit)
    small_or_skip(backend, batch)
    scale = torch.tensor(7.5, dtype=F64, requires_grad=True)
    model_out = dict(image_features=image, text_features=text, logit_scale=scale)
    if bias is not None:
        model_out["logit_bias"] = torch.tensor(bias, dtype=F64, requires_grad=True)
    ours = our_open_clip.ClipLoss(backend=backend)(**model_out, output_dict=True)
    theirs = reference(**model_out, output_dict=True)
    assert list(ours) == list(theirs) == ["contrastive_loss"]
    compare(ours["contrastive_loss"], theirs["contrastive_loss"], [image, text, scale], f"clip B={batch}")
    if bias is not None:  # a softmax ignores a shift: 0 here, open_clip's rounding residue there
        (ours_grad,) = torch.autograd.grad(ours["contrastive_loss"], model_out["logit_bias"])
        (theirs_grad,) = torch.autograd.grad(theirs["contrastive_loss"], model_out["logit_bias"])
        assert float(ours_grad) == 0.0 and abs(float(theirs_grad)) < 1e-12
    plain = our_open_clip.ClipLoss(backend=backend)(image, text, scale, model_out.get("logit_bias"))
    assert_close(plain.detach(), theirs["contrastive_loss"].detach(), F64, "positional call")


def test_clip_loss_signature_and_refusals():
    import inspect

    reference = open_clip_loss().ClipLoss
    for method in ("__init__", "forward"):
        ours = inspect.signature(getattr(our_open_clip.ClipLoss, method)).parameters
        theirs = inspect.signature(getattr(reference, method)).parameters
        assert [(p.name, p.default) for p in theirs.values()] == \
            [(p.name, p.default) for p in ours.values() if p.kind != p.KEYWORD_ONLY]
    image = rand(3, 4)
    with pytest.raises(TypeError):  # a key open_clip's ClipLoss does not take either
        our_open_clip.ClipLoss()(image, image, 1.0, output_dict=True, logits=image)
    with pytest.raises(ValueError, match="use_horovod"):
        our_open_clip.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="world_size"):
        our_open_clip.ClipLoss(rank=0, world_size=2)(image, image, 1.0)  # no process group here


# ----------------------------------------------------------------------------- lightly

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2, 3, 129])
def test_lightly_ntxent_matches_lightly(batch, backend):
    ntx, _ = lightly_losses()
    small_or_skip(backend, batch)
    out0, out1 = rand(batch, 6, seed=batch), rand(batch, 6, seed=batch + 1)
    compare(our_lightly.NTXentLoss(0.3, backend=backend)(out0, out1), ntx.NTXentLoss(0.3)(out0, out1),
            [out0, out1], f"NTXent B={batch}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_ntxent_memory_bank_matches_lightly(backend):
    """Bank (10, 6): the same random start (same seed), then steps that fill it, run past its end (lightly
    cuts the batch there) and an evaluation step (no update); loss, gradients and the bank's rows."""
    ntx, _ = lightly_losses()
    with pytest.raises(ValueError, match="memory_bank_size"):
        our_lightly.NTXentLoss(memory_bank_size=10)
    torch.manual_seed(3)
    theirs = ntx.NTXentLoss(0.2, memory_bank_size=(10, 6)).double()
    torch.manual_seed(3)
    ours = our_lightly.NTXentLoss(0.2, memory_bank_size=(10, 6), backend=backend).double()
    for step, (n, train) in enumerate([(4, True), (4, True), (3, False), (4, True), (2, True), (12, True)]):
        out0, out1 = rand(n, 6, seed=20 + step, grad=train), rand(n, 6, seed=40 + step)
        compare(ours(out0, out1), theirs(out0, out1), [out0, out1], f"bank step {step}")
        assert torch.equal(ours.memory_bank.keys, theirs.memory_bank.bank), f"bank rows after step {step}"
        assert ours.memory_bank._ptr == int(theirs.memory_bank.bank_ptr)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # lightly's weight function
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [2, 3, 129])
@pytest.mark.parametrize("weighted", [False, True])
def test_lightly_dcl_matches_lightly(batch, weighted, backend):
    _, dcl = lightly_losses()
    small_or_skip(backend, batch)
    out0, out1 = rand(batch, 6, seed=batch), rand(batch, 6, seed=batch + 1)
    if weighted:
        ours, theirs = our_lightly.DCLWLoss(0.2, 0.4, backend=backend), dcl.DCLWLoss(0.2, 0.4)
    else:
        ours, theirs = our_lightly.DCLLoss(0.2, backend=backend), dcl.DCLLoss(0.2)
    compare(ours(out0, out1), theirs(out0, out1), [out0, out1], f"DCL weighted={weighted} B={batch}")


def test_lightly_signatures_and_refusals():
    import inspect

    ntx, dcl = lightly_losses()
    for ours, theirs in [(our_lightly.NTXentLoss, ntx.NTXentLoss), (our_lightly.DCLLoss, dcl.DCLLoss),
                         (our_lightly.DCLWLoss, dcl.DCLWLoss)]:
        for method in ("__init__", "forward"):
            mine = inspect.signature(getattr(ours, method)).parameters.values()
            assert [(p.name, p.default) for p in inspect.signature(getattr(theirs, method)).parameters.values()] == \
                [(p.name, p.default) for p in mine if p.kind != p.KEYWORD_ONLY], (ours, method)
    with pytest.raises(ValueError, match="weight_fn"):
        our_lightly.DCLLoss(weight_fn=lambda a, b: a)
    with pytest.raises(ValueError, match="bsz >= 2"):  # lightly gives -inf: no negatives
        our_lightly.DCLLoss()(rand(1, 4), rand(1, 4))


def test_float32_with_the_auto_backend():
    """What a user runs: float32 inputs, backend "auto", each drop-in against its library within the fp32
    row of the tolerance table."""
    from helpers import TOLERANCES

    losses = pytest.importorskip("pytorch_metric_learning.losses")
    ntx, dcl = lightly_losses()
    x, y = rand(64, 32, seed=1).float(), pml_labels("random", 64)
    a, b = rand(64, 32, seed=2).float(), rand(64, 32, seed=3).float()
    a_unit, b_unit = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    cases = [("pml SupCon", our_pml.SupConLoss()(x, y), losses.SupConLoss()(x, y)),
             ("pml NTXent", our_pml.NTXentLoss()(x, y), losses.NTXentLoss()(x, y)),
             ("open_clip", our_open_clip.ClipLoss()(a_unit, b_unit, 14.0),
              open_clip_loss().ClipLoss()(a_unit, b_unit, 14.0)),
             ("lightly NTXent", our_lightly.NTXentLoss()(a, b), ntx.NTXentLoss()(a, b)),
             ("lightly DCL", our_lightly.DCLLoss()(a, b), dcl.DCLLoss()(a, b))]
    for what, ours, theirs in cases:
        assert ours.dtype == theirs.dtype == torch.float32, what
        err = float((ours.double() - theirs.double()).abs() / theirs.double().abs())
        assert err < TOLERANCES[torch.float32], f"{what}: relative error {err:.3g}"


# ----------------------------------------------------------------------------- 2 gloo ranks

def check_distributed(rank, world, lo, hi, features, labels, backends):
    """Equal local batches of 4 (open_clip's local labels assume them). open_clip's four modes against
    ClipLoss(world_size=2) as the open_clip module docstring states; lightly's gathered NTXent / DCL."""
    from test_compat import lightly_losses, open_clip_loss

    reference = open_clip_loss()
    image_all, text_all = rand(8, 6, seed=1, grad=False), rand(8, 6, seed=2, grad=False)
    part = slice(4 * rank, 4 * rank + 4)

    def run(loss_fn, *tensors):
        local = [t[part].clone().requires_grad_() for t in tensors]
        scale = torch.tensor(5.0, dtype=F64, requires_grad=True)
        loss = loss_fn(*local, scale)
        grads = torch.autograd.grad(loss, local + [scale])
        dist.all_reduce(grads[-1])  # a shared parameter: what DDP averages (sum here, world x the mean)
        total = loss.detach().clone()
        dist.all_reduce(total)
        return loss.detach(), total / world, grads

    ours = run(our_open_clip.ClipLoss(rank=rank, world_size=world), image_all, text_all)
    for local_loss, with_grad in [(False, False), (False, True), (True, True), (True, False)]:
        mode = f"rank {rank} local_loss={local_loss} gather_with_grad={with_grad}"
        theirs = run(reference.ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank,
                                        world_size=world), image_all, text_all)
        # The loss: the global one, or (local_loss) this rank's rows' loss whose mean over ranks is ours.
        assert_close(ours[0], theirs[1] if local_loss else theirs[0], F64, mode + " loss")
        if (local_loss, with_grad) == (True, False):
            continue  # not the gradient of any loss (see the open_clip module docstring)
        factor = world if (local_loss, with_grad) == (False, False) else 1
        for i in range(2):
            assert_close(ours[2][i], factor * theirs[2][i], F64, f"{mode} features grad {i}")
        assert_close(ours[2][2], theirs[2][2], F64, mode + " logit_scale grad (DDP sum)")

    ntx, dcl = lightly_losses()
    pairs = [(our_lightly.NTXentLoss(0.3, gather_distributed=True), ntx.NTXentLoss(0.3, gather_distributed=True)),
             (our_lightly.DCLLoss(0.3, gather_distributed=True), dcl.DCLLoss(0.3, gather_distributed=True))]
    for ours_fn, theirs_fn in pairs:
        what = f"rank {rank} lightly {type(theirs_fn).__name__}"
        a = run(lambda x, y, s: ours_fn(x, y) + 0 * s, image_all, text_all)
        b = run(lambda x, y, s: theirs_fn(x, y) + 0 * s, image_all, text_all)
        assert_close(a[0], b[1], F64, what + " loss (ours global, lightly's mean over ranks)")
        for i in range(2):
            assert_close(a[2][i], b[2][i], F64, f"{what} grad {i}")

    # A memory bank with gather_distributed: local losses, every rank enqueues the gathered batch (8 rows
    # into 10: the second step runs past the end and is cut there).
    torch.manual_seed(5)
    theirs_bank = ntx.NTXentLoss(0.3, memory_bank_size=(10, 6), gather_distributed=True).double()
    torch.manual_seed(5)
    ours_bank = our_lightly.NTXentLoss(0.3, memory_bank_size=(10, 6), gather_distributed=True).double()
    for step in range(2):
        out0, out1 = rand(8, 6, seed=3 + step)[part], rand(8, 6, seed=5 + step)[part]
        compare(ours_bank(out0, out1), theirs_bank(out0, out1), [out0, out1], f"rank {rank} bank step {step}")
        assert torch.equal(ours_bank.memory_bank.keys, theirs_bank.memory_bank.bank), f"bank after step {step}"


def test_distributed_modes_on_two_ranks():
    open_clip_loss(), lightly_losses()  # skip here, not in the children, when the libraries are absent
    from test_distributed import spawn

    spawn(check_distributed, 2)


@pytest.mark.parametrize("module", [our_pml, our_open_clip, our_lightly], ids=lambda m: m.__name__.split(".")[-1])
def test_docstring_examples_run(module):
    import doctest

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
