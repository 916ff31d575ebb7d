"""Contrastive losses against soft per-pair targets: SCE (teacher similarities) and CoMatch (a pseudo-label
graph). Both are InfoNCE's pair layout (row i of ``query`` has ``key[i]`` as its positive, a queue or bank of
extra keys after the batch) with the one-hot target replaced by a distribution w_ij built, tile by tile,
from O(N) side inputs (see soft_targets.py): ``L_i = -sum_j w_ij log softmax_j(l_ij)``.
They run on the reference and chunked backends (not the fused kernels: their ``why_not`` says so), in one
process, in gather mode (``process_group``) or ring mode (``distributed="ring"``: each key shard travels with
its side rows), not under torch.compile.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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
        _check_temperature("temperature", temperature)
        _check_temperature("teacher_temperature", teacher_temperature)
        _number("lam", lam, 0.0, 1.0)
        _check_choice("normalize", normalize, (False, True))
        _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
        _check_choice("distributed", distributed, ("gather", "ring"))
        _check_choice("reduction", reduction, REDUCTIONS)
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
        _check_temperature("temperature", temperature)
        _number("threshold", threshold, 0.0, 1.0)
        _check_choice("normalize", normalize, (False, True))
        _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
        _check_choice("distributed", distributed, ("gather", "ring"))
        _check_choice("reduction", reduction, REDUCTIONS)
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


# ----------------------------------------------------------------------------- RényiCL

RENYI_BACKENDS = ("reference", "chunked")


def _renyi_terms(pos: Tensor, neg: Tensor, alpha: float, gamma: float, n_pos: int, n_neg: int):
    """The authors' loss of one target view from the per-row statistics: ``pos`` [R] the positive logits,
    ``neg`` = (row max m_i of gamma l over the negatives, sum_j e^{gamma l_ij - m_i}, sum_j l_ij e^{gamma l_ij - m_i})
    [R] each. Returns (loss, c1 [R] (dL/dl_ii of the first term), the negatives' global shift M and factor f:
    dL/dl_ij = f e^{gamma l_ij - M}, and the positives' factor of the second term g: + g e^{gamma l_ii - M})."""
    neg_max, neg_sum, neg_wsum = neg
    if gamma == 1:
        loss_1 = -pos.sum() / n_pos
        c1 = torch.full_like(pos, -1.0 / n_pos)
    else:  # a self-normalised weighted mean of the positives, weights e^{(gamma - 1) l} (constants to autograd)
        e1 = torch.exp((gamma - 1) * pos - ((gamma - 1) * pos).max())
        loss_1 = -(pos * e1).sum() / e1.sum()
        c1 = -e1 / e1.sum()
    # Second term: the alpha-mixture of the positive and negative means, weights e^{gamma l}, one global shift M.
    shift = torch.maximum((gamma * pos).max(), neg_max.max())
    e_pos = torch.exp(gamma * pos - shift)
    row_scale = torch.exp(neg_max - shift)
    den = alpha * e_pos.sum() / n_pos + (1 - alpha) * (neg_sum * row_scale).sum() / n_neg
    num = alpha * (pos * e_pos).sum() / n_pos + (1 - alpha) * (neg_wsum * row_scale).sum() / n_neg
    return loss_1 + num / den, c1, shift, (1 - alpha) / n_neg / den, alpha / n_pos / den


def _renyi_stats(Q: Tensor, K: Tensor, tau: float, gamma: float, step: int):
    """(positive logits [R], (m_i, sum e^{gamma l - m_i}, sum l e^{gamma l - m_i}) over the negatives) of the rows of
    ``Q`` [S, n, D] (S source views, rows s * n + i) against ``K`` [n, D] (key i is row i's positive), in blocks."""
    views, n = Q.shape[0], Q.shape[1]
    flat = Q.reshape(views * n, -1)
    pos, neg_max, neg_sum, neg_wsum = (torch.empty(views * n, dtype=Q.dtype, device=Q.device) for _ in range(4))
    for r0 in range(0, views * n, step):
        r1 = min(views * n, r0 + step)
        S = flat[r0:r1] @ K.T / tau
        diag = torch.arange(r0, r1, device=Q.device) % n
        local = torch.arange(r1 - r0, device=Q.device)
        pos[r0:r1] = S[local, diag]
        g = gamma * S
        g[local, diag] = float("-inf")
        m = g.amax(1)
        m = torch.where(torch.isfinite(m), m, 0.0)  # (one key: no negatives)
        e = torch.exp(g - m[:, None])
        S[local, diag] = 0.0
        neg_max[r0:r1], neg_sum[r0:r1], neg_wsum[r0:r1] = m, e.sum(1), (S * e).sum(1)
    return pos, (neg_max, neg_sum, neg_wsum)


class _RenyiChunked(torch.autograd.Function):
    """One target view's term, block by block: O(rows) statistics, gradients from two more tile passes."""

    @staticmethod
    def forward(ctx, Q: Tensor, K: Tensor, tau: float, alpha: float, gamma: float):
        from .chunked import block_rows

        views, n = Q.shape[0], Q.shape[1]
        step = block_rows(n)
        pos, neg = _renyi_stats(Q, K, tau, gamma, step)
        loss, c1, shift, f_neg, g_pos = _renyi_terms(pos, neg, alpha, gamma, views * n, views * n * (n - 1))
        ctx.save_for_backward(Q, K, pos, c1, shift, f_neg, g_pos)
        ctx.tau, ctx.gamma, ctx.step = tau, gamma, step
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        Q, K, pos, c1, shift, f_neg, g_pos = ctx.saved_tensors
        tau, gamma, step = ctx.tau, ctx.gamma, ctx.step
        views, n = Q.shape[0], Q.shape[1]
        flat = Q.reshape(views * n, -1)
        dQ, dK = torch.empty_like(flat), torch.zeros_like(K)
        pos_weight = c1 + g_pos * torch.exp(gamma * pos - shift)
        for r0 in range(0, views * n, step):
            r1 = min(views * n, r0 + step)
            diag = torch.arange(r0, r1, device=Q.device) % n
            local = torch.arange(r1 - r0, device=Q.device)
            G = torch.exp(gamma * (flat[r0:r1] @ K.T / tau) - shift) * f_neg
            G[local, diag] = pos_weight[r0:r1]
            G.mul_(grad / tau)
            torch.mm(G, K, out=dQ[r0:r1])
            dK.addmm_(G.T, flat[r0:r1])
        return dQ.reshape(Q.shape), dK, None, None, None


def _renyi_reference(Q: Tensor, K: Tensor, tau: float, alpha: float, gamma: float) -> Tensor:
    """Dense: every [n, n] logit matrix of the term, the weights detached (the oracle)."""
    views, n = Q.shape[0], Q.shape[1]
    logits = Q @ K.T / tau  # [S, n, n]
    eye = torch.eye(n, dtype=torch.bool, device=Q.device).expand_as(logits)
    pos, neg = logits[eye], logits[~eye]
    if gamma == 1:
        loss_1 = -pos.mean()
    else:
        w1 = torch.exp((gamma - 1) * (pos - pos.max())).detach()
        loss_1 = -(pos * w1).sum() / w1.sum()
    if neg.numel() == 0:
        neg = pos.new_zeros(1)[:0]
    shift = (gamma * torch.cat([pos, neg])).max().detach()
    w_pos, w_neg = torch.exp(gamma * pos - shift).detach(), torch.exp(gamma * neg - shift).detach()
    neg_mean = lambda x: x.sum() / max(neg.numel(), 1)  # noqa: E731 (an empty mean is 0: alpha = 1 or n = 1)
    den = alpha * w_pos.mean() + (1 - alpha) * neg_mean(w_neg)
    return loss_1 + (alpha * (pos * w_pos).mean() + (1 - alpha) * neg_mean(neg * w_neg)) / den


@deferred_errors
def renyicl_loss(sources, targets, *, temperature=0.5, alpha=1.0 / 65536, gamma=2.0, normalize=True, backend="auto",
                 reduction="mean", weight=None) -> Tensor:
    """RényiCL (Lee et al., "RényiCL: Contrastive Representation Learning with Skew Rényi Divergence"), the
    authors' objective.

    ``sources [n, V, D]``: the online (predictor) outputs of V >= 2 views; ``targets [n, 2, D]``: the
    momentum outputs of views 0 and 1. For each target view t and every source view s != t,
    ``l_ij = src_s,i . tgt_t,j / temperature`` (rows L2-normalised first, as the authors do; ``normalize=False``
    uses them as given); positives l_ii, negatives l_ij (j != i). Per target view, over all its positives P and
    negatives N: ``-sum_P l e^{(gamma-1) l} / sum_P e^{(gamma-1) l}`` (``-mean_P l`` when gamma = 1) plus
    ``(alpha mean_P l e^{gamma l} + (1-alpha) mean_N l e^{gamma l}) / (alpha mean_P e^{gamma l} + (1-alpha)
    mean_N e^{gamma l})``, the exponential weights being constants to autograd (the authors' stop-gradients);
    the loss is the sum over t = 0, 1. Defaults are the authors' (temperature 0.5, alpha 1/65536, gamma 2).
    A batch-level ratio, not a mean of per-anchor rows: only ``reduction="mean"`` without ``weight``.
    Runs on chunked (per-row statistics, O(n) memory) and reference; one process only.
    """
    _not_traced("renyicl_loss")
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    if reduction != "mean" or weight is not None:
        raise ValueError("reduction and weight: renyicl_loss is a batch-level ratio of sums, not a mean of "
                         "per-anchor losses; only reduction='mean' without weight is defined")
    _check_choice("normalize", normalize, (False, True))
    for name, x, views in (("sources", sources, None), ("targets", targets, 2)):
        if (not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point() or x.shape[0] < 1
                or (views is not None and x.shape[1] != views) or (views is None and x.shape[1] < 2)):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating tensor of shape [n, {views or 'V >= 2'}, D], got {shape}")
        _check_data(name, x)
    if sources.shape[0] != targets.shape[0] or sources.shape[2] != targets.shape[2] or sources.dtype != targets.dtype \
            or sources.device != targets.device:
        raise ValueError(f"sources and targets must share n, D, dtype and device, got {tuple(sources.shape)} "
                         f"{sources.dtype} {sources.device} and {tuple(targets.shape)} {targets.dtype} {targets.device}")
    if sources.shape[0] < 2:
        raise ValueError(f"sources and targets need n >= 2 samples (the negatives of a row are the other samples), "
                         f"got n = {sources.shape[0]}")
    _check_finite(sources=sources, targets=targets)
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        raise ValueError("temperature must be a number (or a tensor without grad) for renyicl_loss: its weights "
                         "are stop-gradient constants, the temperature gets no gradient here")
    tau = _number("temperature", float(temperature) if isinstance(temperature, Tensor) else temperature, 0.0)
    acc = _accum_dtype(sources)
    _check_inverse("temperature", tau, acc)
    alpha = _number("alpha", alpha, 0.0, 1.0)
    gamma = _number("gamma", gamma)
    chosen = "chunked" if backend == "auto" else backend
    if chosen not in RENYI_BACKENDS:
        raise RuntimeError(f"backend {backend!r} cannot run this input: no fused kernel for RényiCL (a batch-level "
                           "ratio of exponentially weighted sums); use chunked or reference")
    src = sources.to(acc)
    tgt = targets.to(acc)
    if normalize:
        src = normalize_rows(src.reshape(-1, src.shape[-1]), acc).reshape(src.shape)
        tgt = normalize_rows(tgt.reshape(-1, tgt.shape[-1]), acc).reshape(tgt.shape)
    loss = src.new_zeros(())
    for t in range(2):
        Q = torch.stack([src[:, s] for s in range(src.shape[1]) if s != t])
        K = tgt[:, t]
        if chosen == "reference":
            loss = loss + _renyi_reference(Q, K, tau, alpha, gamma)
        else:
            loss = loss + _RenyiChunked.apply(Q, K, tau, alpha, gamma)
    return loss.to(torch.promote_types(sources.dtype, torch.float32)) if sources.dtype != torch.float64 else loss


class RenyiCLLoss(_LossModule):
    __doc__ = """Module form of ``renyicl_loss`` (RényiCL, Lee et al.). ``forward(sources [n, V, D],
    targets [n, 2, D])``.
    """ + _example("criterion = fc.RenyiCLLoss(temperature=0.5, gamma=2.0)",
                   "loss = criterion(torch.randn(8, 2, 16, requires_grad=True), torch.randn(8, 2, 16))")

    fn = staticmethod(renyicl_loss)

    def __init__(self, *, temperature=0.5, alpha=1.0 / 65536, gamma=2.0, normalize=True, backend="auto"):
        _number("temperature", temperature, 0.0)
        _number("alpha", alpha, 0.0, 1.0)
        _number("gamma", gamma)
        _check_choice("normalize", normalize, (False, True))
        _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
        super().__init__(temperature=temperature, alpha=alpha, gamma=gamma, normalize=normalize, backend=backend)

    def forward(self, sources: Tensor, targets: Tensor) -> Tensor:
        return renyicl_loss(sources, targets, **self.kwargs)


# ----------------------------------------------------------------------------- CACR

def _sq_dist(X: Tensor, Y: Tensor) -> Tensor:
    """||x_i - y_j||^2 from the Gram product (what a tile computes): [len(X), len(Y)], clamped at 0."""
    return ((X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2 * X @ Y.T).clamp_(min=0)


def _repulsion_rows(d: Tensor, diag: Tensor, local: Tensor, tau_neg: float):
    """(w, mean distance dbar) of rows of squared distances ``d`` with each row's own sample (column ``diag``)
    out: w_ij = softmax_j(-tau_neg d_ij), dbar_i = sum_j w_ij d_ij."""
    t = -tau_neg * d
    t[local, diag] = float("-inf")
    w = torch.softmax(t, dim=1)
    d = d.clone()
    d[local, diag] = 0.0
    return w, (w * d).sum(1), d


class _RepulsionChunked(torch.autograd.Function):
    """mean_i of -beta sum_{j != i} w_ij d_ij, w_ij = softmax_j(-tau_neg d_ij) (differentiated through, as the
    authors' code does), block by block: g_ij = -beta w_ij (1 - tau_neg (d_ij - dbar_i)) / n."""

    @staticmethod
    def forward(ctx, X: Tensor, Y: Tensor, beta: float, tau_neg: float):
        from .chunked import block_rows

        n, step = X.shape[0], block_rows(X.shape[0])
        dbar = torch.empty(n, dtype=X.dtype, device=X.device)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            local = torch.arange(r1 - r0, device=X.device)
            _, dbar[r0:r1], _ = _repulsion_rows(_sq_dist(X[r0:r1], Y), local + r0, local, tau_neg)
        ctx.save_for_backward(X, Y, dbar)
        ctx.beta, ctx.tau_neg, ctx.step = beta, tau_neg, step
        return -beta * dbar.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        X, Y, dbar = ctx.saved_tensors
        n, step = X.shape[0], ctx.step
        dX, dY = torch.empty_like(X), torch.zeros_like(Y)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            local = torch.arange(r1 - r0, device=X.device)
            w, _, d = _repulsion_rows(_sq_dist(X[r0:r1], Y), local + r0, local, ctx.tau_neg)
            G = w * (1 - ctx.tau_neg * (d - dbar[r0:r1, None])) * (-ctx.beta * grad / n)
            G[local, local + r0] = 0.0
            # d_ij = |x_i|^2 + |y_j|^2 - 2 x_i . y_j
            dX[r0:r1] = 2 * (X[r0:r1] * G.sum(1)[:, None] - G @ Y)
            dY.add_(2 * (Y * G.sum(0)[:, None] - G.T @ X[r0:r1]))
        return dX, dY, None, None


def _repulsion_reference(X: Tensor, Y: Tensor, beta: float, tau_neg: float) -> Tensor:
    n = X.shape[0]
    local = torch.arange(n, device=X.device)
    w, dbar, _ = _repulsion_rows(_sq_dist(X, Y), local, local, tau_neg)
    return -beta * dbar.mean()


def _attraction(z: Tensor, alpha: float, tau_pos: float) -> Tensor:
    """mean over query views x and samples of sum_p w_p alpha ||z_x - z_p||^2 over the sample's other views p,
    w = softmax_p(tau_pos ||z_x - z_p||^2) (differentiated through); O(n V^2) terms, no batch-pair matrix."""
    views = z.shape[1]
    sq = ((z[:, :, None] - z[:, None, :]) ** 2).sum(-1)  # [n, V, V]
    off = ~torch.eye(views, dtype=torch.bool, device=z.device)
    sq = sq[:, off].reshape(z.shape[0], views, views - 1)
    w = torch.softmax(tau_pos * sq, dim=-1)
    return (alpha * sq * w).sum(-1).mean(0).sum() / views


@deferred_errors
def cacr_loss(features, *, alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=1.0, normalize=False, backend="auto",
              reduction="mean", weight=None) -> Tensor:
    """CACR (Zheng et al., "Contrastive Attraction and Contrastive Repulsion for Representation Learning"), the
    authors' loss with the Euclidean cost (their default; ``choice="full"``, not debiased).

    ``features [n, V, D]`` (V >= 2 views of n >= 2 samples). Attraction: for each query view x and sample i,
    ``sum_p w_p alpha ||z_xi - z_pi||^2`` over the sample's other views p, ``w = softmax_p(tau_pos ||.||^2)`` (the
    farther positives weigh more), averaged over samples and over x. Repulsion: for each pair of views x < y,
    ``mean_i -beta sum_{j != i} w_ij ||z_xi - z_yj||^2``, ``w_ij = softmax_j(-tau_neg ||.||^2)`` (the closer
    negatives weigh more), averaged over the pairs. The loss is their sum; the softmax weights are
    differentiated through, as in the authors' code. Features are used as given (the authors' encoder
    L2-normalises its output), or normalised first with ``normalize=True``. The repulsion runs on chunked
    (row-block tiles of squared distances, O(n) saved) or reference; a batch mean, so only ``reduction="mean"``
    without ``weight`` here. One process only.
    """
    _not_traced("cacr_loss")
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    if reduction != "mean" or weight is not None:
        raise ValueError("reduction and weight: cacr_loss supports reduction='mean' without weight only in this version")
    _check_choice("normalize", normalize, (False, True))
    if (not isinstance(features, Tensor) or features.dim() != 3 or not features.is_floating_point()
            or features.shape[0] < 2 or features.shape[1] < 2):
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a floating tensor of shape [n, V, D] with n >= 2 and V >= 2, got {shape}")
    _check_data("features", features)
    _check_finite(features=features)
    alpha, beta = _number("alpha", alpha), _number("beta", beta)
    tau_pos, tau_neg = _number("tau_pos", tau_pos), _number("tau_neg", tau_neg)
    chosen = "chunked" if backend == "auto" else backend
    if chosen not in RENYI_BACKENDS:
        raise RuntimeError(f"backend {backend!r} cannot run this input: no fused kernel for CACR (Euclidean costs "
                           "with softmax weights differentiated through); use chunked or reference")
    acc = _accum_dtype(features)
    z = features.to(acc)
    if normalize:
        z = normalize_rows(z.reshape(-1, z.shape[-1]), acc).reshape(z.shape)
    views = z.shape[1]
    repulsion, pairs = z.new_zeros(()), 0
    for x in range(views):
        for y in range(x + 1, views):
            X, Y = z[:, x].contiguous(), z[:, y].contiguous()
            if chosen == "reference":
                repulsion = repulsion + _repulsion_reference(X, Y, beta, tau_neg)
            else:
                repulsion = repulsion + _RepulsionChunked.apply(X, Y, beta, tau_neg)
            pairs += 1
    loss = _attraction(z, alpha, tau_pos) + repulsion / pairs
    return loss if features.dtype == torch.float64 else loss.float()


class CACRLoss(_LossModule):
    __doc__ = """Module form of ``cacr_loss`` (CACR, Zheng et al.). ``forward(features [n, V, D])``.
    """ + _example("criterion = fc.CACRLoss(tau_pos=1.0, tau_neg=1.0)",
                   "loss = criterion(torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1).requires_grad_())")

    fn = staticmethod(cacr_loss)

    def __init__(self, *, alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=1.0, normalize=False, backend="auto"):
        for name, value in (("alpha", alpha), ("beta", beta), ("tau_pos", tau_pos), ("tau_neg", tau_neg)):
            _number(name, value)
        _check_choice("normalize", normalize, (False, True))
        _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
        super().__init__(alpha=alpha, beta=beta, tau_pos=tau_pos, tau_neg=tau_neg, normalize=normalize, backend=backend)

    def forward(self, features: Tensor) -> Tensor:
        return cacr_loss(features, **self.kwargs)
