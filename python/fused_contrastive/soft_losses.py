"""Contrastive losses against soft per-pair targets: SCE (teacher similarities) and CoMatch (a pseudo-label
graph). Both are InfoNCE's pair layout (row i of ``query`` has ``key[i]`` as its positive, a queue or bank of
extra keys after the batch) with the one-hot target replaced by a distribution w_ij built, tile by tile,
from O(N) side inputs (see soft_targets.py): ``L_i = -sum_j w_ij log softmax_j(l_ij)``.
They run on the reference, chunked and triton backends (triton_kernels/soft.py; not the CUDA kernels, whose
``why_not`` says so), in one process, in gather mode (``process_group``) or ring mode (``distributed="ring"``: each key shard travels with
its side rows), not under torch.compile.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .compiled import compiling, deferred_errors
from .distributed import agreed
from .family import _GROUP_DOC, _blocks_loss, _example, _info_nce_spec, _number, _pair
from .losses import (_accum_dtype, _check_data, _check_finite, _check_inverse, _check_temperature, _check_choice,
                     _check_weight, _LossModule, _reduced)
from .spec import REDUCTIONS, SoftTarget, normalize_rows


def _side(name: str, value, rows: Optional[int], like: Tensor, width: Optional[int] = None) -> Tensor:
    """A side input: a floating [rows, S] tensor on ``like``'s device (``rows`` None: any count)."""
    if (not isinstance(value, Tensor) or value.dim() != 2 or not value.is_floating_point()
            or (rows is not None and value.shape[0] != rows) or (width is not None and value.shape[1] != width)):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        want = f"[{rows if rows is not None else 'n'}, {width if width is not None else 'S'}]"
        raise ValueError(f"{name} must be a floating tensor of shape {want}, got {shape}"
                         + (f" {value.dtype}" if isinstance(value, Tensor) else ""))
    _check_data(name, value)
    if value.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {value.device}")
    _check_finite(**{name: value})
    return value


def _extra(name: str, value, like: Tensor) -> Optional[Tensor]:
    """A queue / bank of extra keys [E, D] with the batch's dtype and device, or None."""
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[1] != like.shape[1]:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor of shape [E, D] with D = {like.shape[1]}, got {shape}")
    _check_data(name, value)
    if value.dtype != like.dtype or value.device != like.device:
        raise ValueError(f"{name} must have the query's dtype and device ({like.dtype}, {like.device}), got "
                         f"{value.dtype} on {value.device}")
    _check_finite(**{name: value})
    return value


def _not_traced(loss: str) -> None:
    if compiling():
        raise ValueError(f"{loss} does not run under torch.compile in this version (soft per-pair targets have "
                         "no compiled op): call it outside the compiled region")


def _soft_spec(q, k, extra, temperature, normalize: bool, target: SoftTarget):
    spec = _info_nce_spec(q, k, temperature, extra, True)
    return dataclasses.replace(spec, normalize=normalize, soft_target=target)


def _prepared(side: Tensor, acc: torch.dtype, normalize: bool) -> Tensor:
    side = side.detach().to(acc)
    return normalize_rows(side, acc) if normalize else side


def _soft_loss(target, prepare, query: Tensor, key: Tensor, side: Tensor, extra: Optional[Tensor],
               extra_side: Optional[Tensor], *, temperature, normalize: bool, backend: str, process_group,
               distributed: str, reduction: str, weight) -> Tensor:
    """The pair loss of ``query`` against ``[key; extra]`` with the soft target ``target(anchor_side, key_side)``
    built from the per-sample ``side`` rows (and ``extra_side`` for the extra keys), each ``prepare``d (detached,
    accumulation dtype): in one process, gather mode (the side rows gathered with the features), or ring mode
    (each key shard travels with its side rows; the extra keys and theirs stay home)."""
    _check_choice("distributed", distributed, ("gather", "ring"))
    extra_side = None if extra_side is None else prepare(extra_side)
    if process_group is not None and distributed == "ring":
        from . import distributed as ring

        _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
        _check_choice("reduction", reduction, REDUCTIONS)
        weight = _check_weight(weight, [(query.shape[0],)], query.device, "one per pair")
        mine = prepare(side)
        extra_rows = 0 if extra is None else extra.shape[0]

        def build_ring(q, k):  # on placeholders of the global batch: the side rows are the ring's, per shard
            rows = q.shape[0]
            return _soft_spec(q, k, extra, temperature, normalize,
                              target(ring._placeholder(mine, rows), ring._placeholder(mine, rows + extra_rows)))

        return ring.ring_pairs([build_ring], query, key, group=process_group, backend=backend,
                               reduce=lambda spec, w: _reduced(spec, reduction, w, 1), weight=weight,
                               sides=(mine, mine, extra_side))[0]

    def build(q, k, s):
        s = prepare(s)
        return _soft_spec(q, k, extra, temperature, normalize,
                          target(s, s if extra_side is None else torch.cat([s, extra_side])))

    return _blocks_loss([build], (query, key, side.detach()), 1, backend=backend, process_group=process_group,
                        reduction=reduction, weight=weight)


# ----------------------------------------------------------------------------- SCE

@agreed
@deferred_errors
def sce_loss(query, key, teacher=None, *, queue=None, teacher_queue=None, temperature=0.1, teacher_temperature=0.07,
             lam=0.5, normalize=False, backend="auto", process_group=None, distributed="gather", reduction="mean",
             weight=None) -> Tensor:
    """SCE (Denize et al., "Similarity Contrastive Estimation for Self-Supervised Soft Contrastive Learning").

    Row i of ``query [B, D]`` against the keys ``[key; queue]`` (``key [B, D]``, ``queue [Qn, D]``), its
    positive ``key[i]``: ``L_i = -sum_j w_ij log softmax_j(l_ij)``, ``l_ij = q_i . k_j / temperature``, with
    ``w_ij = lam 1[j = i] + (1 - lam) softmax_{j != i}(t_ij / teacher_temperature)``, the teacher similarity
    ``t_ij = teacher_i . [teacher; teacher_queue]_j`` (the positive's own t_ii is out of that softmax).
    ``teacher [B, Dt]`` defaults to ``key`` and ``teacher_queue`` to ``queue`` (the authors' form: the
    momentum keys are the teacher); the teacher gets no gradient. This is the authors' ``use_keys=True``
    form (the other batch keys are negatives and teacher candidates). With one sample and no queue the
    whole target is on the positive. ``normalize=True`` L2-normalises query, key, queue and the teacher rows.
    Queue rows get no gradient; query and key do. Mean over rows (``reduction``, ``weight [B]`` as
    ``info_nce``). Memory O(B + Qn) beyond the inputs: each tile rebuilds its targets.
    """
    _not_traced("sce_loss")
    _pair("query", query, "key", key)
    _check_choice("normalize", normalize, (False, True))
    lam = _number("lam", lam, 0.0, 1.0)
    tau_t = _check_temperature("teacher_temperature", teacher_temperature)
    tau_t = float(tau_t.detach()) if isinstance(tau_t, Tensor) else float(tau_t)
    _check_inverse("teacher_temperature", tau_t, _accum_dtype(query))
    queue = _extra("queue", queue, query)
    if teacher is None:
        if teacher_queue is not None:
            raise ValueError("teacher_queue was given without teacher (the default teacher is key, its queue the queue)")
        teacher = key
        teacher_queue = queue
    else:
        teacher = _side("teacher", teacher, query.shape[0], query)
        if queue is not None and teacher_queue is None:
            raise ValueError("teacher_queue must be given with teacher and queue (the teacher's rows of the queue)")
        if queue is None and teacher_queue is not None:
            raise ValueError("teacher_queue was given without queue")
    if teacher_queue is not None:
        teacher_queue = _side("teacher_queue", teacher_queue, queue.shape[0], query, teacher.shape[1])

    acc = _accum_dtype(query)
    return _soft_loss(lambda anchor_side, key_side: SoftTarget("teacher", anchor_side, key_side, lam=lam, tau_t=tau_t),
                      lambda t: _prepared(t, acc, normalize), query, key, teacher, queue, teacher_queue,
                      temperature=temperature, normalize=normalize, backend=backend, process_group=process_group,
                      distributed=distributed, reduction=reduction, weight=weight)


# ----------------------------------------------------------------------------- CoMatch

@agreed
@deferred_errors
def comatch_loss(query, key, probs, *, bank=None, bank_probs=None, temperature=0.2, threshold=0.8, normalize=False,
                 backend="auto", process_group=None, distributed="gather", reduction="mean", weight=None) -> Tensor:
    """CoMatch's graph-contrastive loss (Li et al., "CoMatch: Semi-supervised Learning with Contrastive Graph
    Regularization"), as the authors' code computes it, without its 1e-7 inside the log.

    Row i of ``query [B, D]`` (the first strong view) against the keys ``[key; bank]`` (``key [B, D]`` the
    second strong view, ``bank [E, D]`` a memory bank, no gradient): ``L_i = -sum_j W_ij log softmax_j(l_ij)``,
    ``l_ij = q_i . k_j / temperature``. The target graph comes from the pseudo-label probabilities
    ``probs [B, C]`` (and ``bank_probs [E, C]`` for the bank's keys): ``u_ij = p_i . p_j``, ``u_ii = 1`` (the
    self-loop: key i is the other view of sample i), entries below ``threshold`` set to 0, then
    ``W_ij = u_ij / sum_j u_ij``. The probabilities get no gradient. Without a bank this is the authors'
    loss exactly (their bank smooths the probabilities, which is the user's step); with one, its keys are
    more graph nodes. ``threshold`` in [0, 1]. ``normalize=True`` L2-normalises query, key and bank first.
    """
    _not_traced("comatch_loss")
    _pair("query", query, "key", key)
    _check_choice("normalize", normalize, (False, True))
    threshold = _number("threshold", threshold, 0.0, 1.0)
    probs = _side("probs", probs, query.shape[0], query)
    bank = _extra("bank", bank, query)
    if (bank is None) != (bank_probs is None):
        raise ValueError("bank and bank_probs must be given together (every bank key needs its probabilities)")
    if bank_probs is not None:
        bank_probs = _side("bank_probs", bank_probs, bank.shape[0], query, probs.shape[1])

    acc = _accum_dtype(query)
    return _soft_loss(lambda anchor_side, key_side: SoftTarget("graph", anchor_side, key_side, threshold=threshold),
                      lambda p: p.detach().to(acc), query, key, probs, bank, bank_probs, temperature=temperature,
                      normalize=normalize, backend=backend, process_group=process_group, distributed=distributed,
                      reduction=reduction, weight=weight)


# ----------------------------------------------------------------------------- modules

_QUERY = "torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).requires_grad_()"
_KEY = "torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)"


class SCELoss(_LossModule):
    __doc__ = """Module form of ``sce_loss`` (SCE, Denize et al.): InfoNCE against the soft target
    ``lam 1[j = i] + (1 - lam) softmax_{j != i}(t_ij / teacher_temperature)``. ``forward(query, key,
    teacher=None, *, queue=None, teacher_queue=None, weight=None)``.
    """ + _example("criterion = fc.SCELoss(temperature=0.1, teacher_temperature=0.07, lam=0.5)",
                   f"loss = criterion({_QUERY}, {_KEY})")

    fn = staticmethod(sce_loss)

    def __init__(self, *, temperature=0.1, teacher_temperature=0.07, lam=0.5, normalize=False, backend="auto",
                 process_group=None, distributed="gather", reduction="mean"):
        _check_temperature("teacher_temperature", teacher_temperature)
        _number("lam", lam, 0.0, 1.0)
        super().__init__(temperature=temperature, teacher_temperature=teacher_temperature, lam=lam,
                         normalize=normalize, backend=backend, process_group=process_group, distributed=distributed,
                         reduction=reduction)

    def forward(self, query: Tensor, key: Tensor, teacher: Optional[Tensor] = None, *, queue=None,
                teacher_queue=None, weight: Optional[Tensor] = None) -> Tensor:
        return sce_loss(query, key, teacher, queue=queue, teacher_queue=teacher_queue, weight=weight, **self.kwargs)


class CoMatchLoss(_LossModule):
    __doc__ = """Module form of ``comatch_loss`` (CoMatch, Li et al.): InfoNCE against the thresholded,
    row-normalised pseudo-label graph ``p_i . p_j`` (self-loop 1). ``forward(query, key, probs, *, bank=None,
    bank_probs=None, weight=None)``.
    """ + _example("criterion = fc.CoMatchLoss(temperature=0.2, threshold=0.8)",
                   "probs = torch.softmax(torch.randn(8, 4), dim=1)",
                   f"loss = criterion({_QUERY}, {_KEY}, probs)")

    fn = staticmethod(comatch_loss)

    def __init__(self, *, temperature=0.2, threshold=0.8, normalize=False, backend="auto", process_group=None,
                 distributed="gather", reduction="mean"):
        _number("threshold", threshold, 0.0, 1.0)
        super().__init__(temperature=temperature, threshold=threshold, normalize=normalize, backend=backend,
                         process_group=process_group, distributed=distributed, reduction=reduction)

    def forward(self, query: Tensor, key: Tensor, probs: Tensor, *, bank=None, bank_probs=None,
                weight: Optional[Tensor] = None) -> Tensor:
        return comatch_loss(query, key, probs, bank=bank, bank_probs=bank_probs, weight=weight, **self.kwargs)


_SOFT_RING_DOC = """
    Soft targets in these modes: gather mode gathers the side rows (teacher rows / probabilities) with the
    features; ring mode sends each key shard around with its side rows (the queue / bank and theirs stay
    home): O(B + Qn) extra memory, two key + side shards held at a time."""
for _fn in (sce_loss, comatch_loss):
    _fn.__doc__ += _GROUP_DOC + _SOFT_RING_DOC
