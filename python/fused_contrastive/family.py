"""The rest of the contrastive family, each as a description of the general loss (docs/design.md).

Every function validates its arguments, builds a ``ContrastSpec`` (usually SupCon's,
then changes its denominator rule, positive weights or row formula) and dispatches it
like ``supcon_loss``: no loss here has its own kernel. What each one sets:

========================  ==============================================================
eps_supinfonce_loss       variant "eps", positives out of the denominator (LSE_N)
dcl_loss                  positives out of the denominator; DCLW: a weight w_i per positive
info_nce                  Q = query, K = key (+ queue); positive = key[i]; no self
clip_loss                 info_nce both ways with tau = 1 / logit_scale
debiased_contrastive_loss variant "debiased", positives out of the denominator
bcl_loss                  b_ij = -log(count of key j's class, minus 1 for the anchor's class)
spread_loss               view u anchors vs view v < u keys; b_ij = -inf for keys of another class
symmetric_spread_loss     every view an anchor; b_ij = -inf for keys of another class
unicon_loss               keys = the universum rows (labelled by their source sample), self's out
suncet_loss               variant "in" (L_in) minus the constant mean log |P_i|; support = extra keys
========================  ==============================================================

Every loss also has a module form (``SupConLoss``, ``EpsSupInfoNCELoss``, ``DCLLoss``, ``InfoNCELoss``,
``ClipLoss``, ``DebiasedContrastiveLoss``, ``BCLLoss``, ``SpreadLoss``, ``SymmetricSpreadLoss``, ``UniConLoss``,
``SuNCEtLoss``): the constructor takes the function's
settings (validated there, with the function's ValueErrors), ``forward`` the per-call tensors, and it calls
the function. Tensor settings given to the constructor (temperature, logit_scale, logit_bias, class_centers)
are registered: an ``nn.Parameter`` as a parameter, any other tensor as a buffer. The constructor's defaults
are the function's, except (the one list of such differences):

==========================  ==================  =================  ==============================================
argument                    module default      function default   why
==========================  ==================  =================  ==============================================
SupConLoss base_temperature 0.07                None (= tau)       SupContrast's constructor has 0.07, its loss
                                                                   scale is then tau / 0.07; the function keeps
                                                                   scale 1 unless asked
ClipLoss logit_scale        None (constructor   required           open_clip passes it per call; a loss that
                            and forward)                           owns its scale registers it instead (one of
                                                                   the two must give it)
==========================  ==================  =================  ==============================================
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import compiled, dispatch
from .compiled import compiling, deferred_errors, require
from .distributed import agreed, append_keys
from .losses import (CONTRAST_MODES, _accum_dtype, _check_base_temperature, _check_choice, _check_data,
                     _check_finite, _check_inverse, _check_labels, _check_scale, _check_temperature, _common_labels,
                     _extra_keys, _flatten_views, _gathered_views, _LossModule, _one_of, _check_weight, _reduced,
                     _view_weight, _views_layout, dense_ids, supcon_spec, tau_unknown, PAIRS_REDUCTION_DOC,
                     VIEWS_REDUCTION_DOC)
from .spec import REDUCTIONS, ContrastSpec, DenominatorBias, mean_divisor, normalize_rows


def _number(name: str, value, low: float = -math.inf, high: float = math.inf, *, closed_high: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if not (low <= value and (value <= high if closed_high else value < high)):
        bound = "]" if closed_high else ")"
        raise ValueError(f"{name} must lie in [{low}, {high}{bound}, got {value}")
    return value


def _check_sigma(sigma) -> float:
    sigma = _number("sigma", sigma, 0.0)
    if sigma == 0:
        raise ValueError("sigma must be > 0")
    return sigma


def _check_logit_scale(logit_scale) -> float:
    """CLIP's (exponentiated) scale: a positive number or one-element floating tensor; its value, NaN for a
    tensor while tracing (the op checks the same range when the graph runs)."""
    if isinstance(logit_scale, Tensor):
        _check_data("logit_scale", logit_scale)
        if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
            raise ValueError(f"logit_scale must be a positive number or a one-element floating tensor, got shape "
                             f"{tuple(logit_scale.shape)} and dtype {logit_scale.dtype}")
        scale_value = math.nan if compiling() else float(logit_scale.detach())
    elif isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool):
        scale_value = float(logit_scale)
    else:
        raise ValueError(f"logit_scale must be a positive number or a one-element tensor, got {type(logit_scale).__name__}")
    traced = math.isnan(scale_value) and isinstance(logit_scale, Tensor) and compiling()
    if not traced and not (math.isfinite(scale_value) and scale_value > 0):
        raise ValueError(f"logit_scale must be a finite number > 0 (the exponentiated scale), got {scale_value}")
    return scale_value


def _check_logit_bias(logit_bias) -> None:
    if isinstance(logit_bias, Tensor):  # one bias, added to every logit
        _check_data("logit_bias", logit_bias)
        if logit_bias.numel() != 1 or logit_bias.is_complex() or logit_bias.dtype == torch.bool:
            raise ValueError(f"logit_bias must be a number or a one-element real tensor, got shape "
                             f"{tuple(logit_bias.shape)} and dtype {logit_bias.dtype}")
        _check_finite(logit_bias=logit_bias)
    elif logit_bias is not None and (isinstance(logit_bias, bool) or not isinstance(logit_bias, numbers.Real)):
        raise ValueError(f"logit_bias must be a number or a one-element tensor, got {type(logit_bias).__name__}")


def _without_positives(spec: ContrastSpec) -> DenominatorBias:
    """Every key sharing the anchor's label leaves its denominator (what remains is N_i)."""
    acc, groups = spec.accum_dtype, spec.num_classes
    same = torch.full((groups,), float("-inf"), dtype=acc, device=spec.device)
    return DenominatorBias(spec.anchor_labels, spec.key_labels, same, torch.zeros_like(same))


def _not_compiled(process_group) -> None:
    if process_group is not None and compiling():
        raise ValueError("process_group cannot be combined with torch.compile in this version (compile the model, "
                         "call the loss outside the compiled region)")


def _views_loss(build, features: Tensor, labels, *, contrast_mode: str = "all", backend: str, process_group,
                reduction: str = "mean", weight=None, distributed: str = "gather") -> Tensor:
    """Run ``build(features, labels) -> spec`` on this process's batch, or on the global batch of
    ``process_group`` (each rank computing its own anchors; see fused_contrastive.distributed), reduced as
    ``reduction`` with the per-sample (or per-view) ``weight``; in gather or ring mode (the same ``build`` on
    the global labels)."""
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("distributed", distributed, ("gather", "ring"))
    _not_compiled(process_group)
    weight = _view_weight(weight, features, contrast_mode)
    views = features.shape[1] if contrast_mode == "all" else 1
    if process_group is None:
        result = compiled.run(_reduced(build(features, labels), reduction, weight, views), backend)
        return _views_layout(result, reduction, views, contrast_mode)
    # build() validates the global batch: the same inputs on every rank, so every rank raises alike.
    return _gathered_views(process_group, features, labels, contrast_mode, backend, build, reduction, weight,
                           mode=distributed)


def _pairs_loss(builds, first: Tensor, second: Tensor, *, backend: str, process_group,
                names: tuple = (), reduction: str = "mean", weight=None, distributed: str = "gather") -> list[Tensor]:
    """Same for row-paired inputs (query/key, image/text): one result per ``build(first, second) -> spec``,
    whose anchors are rows of one of the two (both directions of CLIP share one gather; in ring mode each
    direction passes the other input around the ring: CLIP's text rows against the travelling image shards),
    each reduced as ``reduction`` with the per-pair ``weight [B]``."""
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("distributed", distributed, ("gather", "ring"))
    _not_compiled(process_group)
    weight = _check_weight(weight, [(first.shape[0],)], first.device, "one per pair")
    if process_group is None:
        return [compiled.run(_reduced(build(first, second), reduction, weight, 1), backend, *names[i:i + 1])
                for i, build in enumerate(builds)]
    from . import distributed as dist_mode

    if distributed == "ring":
        return dist_mode.ring_pairs(builds, first, second, group=process_group, backend=backend,
                                    reduce=lambda spec, w: _reduced(spec, reduction, w, 1), weight=weight)
    batch = dist_mode.gather_batch(process_group, first, second, weight)
    ranges = dist_mode.view_ranges(batch, 1)
    return [dist_mode.run_rows(_reduced(build(*batch.tensors[:2]), reduction, batch.tensors[2], 1), ranges,
                               process_group, backend) for build in builds]


_GROUP_DOC = """
    ``process_group``: a torch.distributed group; each rank passes its local batch and gets the loss of
    the global batch (ranks' batches concatenated in rank order), every gradient being world_size x this
    rank's share so that DDP's averaging matches single-process training (fused_contrastive.distributed).
    Non-per-sample tensors (queue, extra keys, class centers, temperature) must be the same on every rank,
    and every other argument too: the ranks compare them first, and all raise the same ValueError when one
    rank's input is invalid or the ranks differ (only the batch size may).
    ``distributed``: ``"gather"`` (default) all-gathers the per-sample inputs; ``"ring"`` passes the keys
    around the ring instead, one rank's shard at a time (only O(N) labels and scalars are gathered; extra keys,
    a queue and class centers stay home): the same loss and gradients, for when the gathered keys do not fit.
    Labels (where taken) of any real dtype compare by value as ``torch.eq`` does; NaN labels are refused (NaN
    equals no label, so such a sample would have no positive). Non-finite features give a non-finite loss, as
    torch's losses do, unless FUSED_CONTRASTIVE_CHECK_FINITE=1 (then a ValueError; a host sync per input)."""


# ----------------------------------------------------------------------------- epsilon-SupInfoNCE

@agreed
@deferred_errors
def eps_supinfonce_loss(features, labels=None, *, epsilon=0.1, temperature=0.1, base_temperature=None,
                        contrast_mode="all", backend="auto", process_group=None, distributed="gather", extra_keys=None,
                        extra_key_labels=None, reduction="mean", weight=None, normalize=False, form="out") -> Tensor:
    """epsilon-SupInfoNCE (Barbano et al., "Unbiased Supervised Contrastive Learning").

    Each positive p of anchor i has its own denominator ``exp(l_ip - epsilon) + sum_n exp(l_in)`` over the
    negatives n (keys of another label): ``L_i = -(c/|P_i|) sum_p [l_ip - log(exp(l_ip - epsilon) +
    sum_n exp(l_in))]``, c = temperature / base_temperature (1 when None); mean over anchors, 0 for an
    anchor without positives. ``features [bsz, n_views, D]``; no labels: the other views are the positives.
    Computed as two statistics per row (LSE_N, then the per-positive softplus terms), never an N x N buffer.
    ``extra_keys`` / ``extra_key_labels``: keys that are never anchors (a memory bank), as in ``supcon_loss``.
    ``normalize=True`` L2-normalises every row (views and extra keys) first.
    ``form="in"``: the authors' L_in form, ``L_i = -c [log sum_p exp(l_ip) - log(e^{-epsilon} / |P_i|
    sum_p exp(l_ip) + sum_n exp(l_in))]``: SupCon's L_in with the positives weighted e^{-epsilon} / |P_i| in
    the denominator (a per-class denominator bias: |P_i| is the same for every anchor of a class) and without
    its log |P_i| term.
    """
    epsilon = _number("epsilon", epsilon, 0.0)
    features = _flatten_views(features)
    _check_finite(features=features)
    _check_scale("epsilon", epsilon, _accum_dtype(features), "epsilon", overflows="l_ip - epsilon")
    _check_choice("form", form, ("out", "in"))
    if form == "in":
        return _eps_in(features, labels, epsilon=epsilon, temperature=temperature, base_temperature=base_temperature,
                       contrast_mode=contrast_mode, backend=backend, process_group=process_group,
                       distributed=distributed, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                       reduction=reduction, weight=weight, normalize=normalize)

    def build(f, y):
        spec = supcon_spec(f, y, temperature=temperature, base_temperature=base_temperature,
                           contrast_mode=contrast_mode, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                           normalize=normalize)
        return dataclasses.replace(spec, variant="eps", epsilon=epsilon, den_bias=_without_positives(spec))

    return _views_loss(build, features, labels, contrast_mode=contrast_mode, backend=backend,
                       process_group=process_group, distributed=distributed, reduction=reduction, weight=weight)


def _positive_bias(spec: ContrastSpec, log_weight: Tensor) -> DenominatorBias:
    """Keys of the anchor's class weighted exp(log_weight[class]) in its denominator, the others 1."""
    return DenominatorBias(spec.anchor_labels, spec.key_labels, log_weight.to(spec.accum_dtype),
                           torch.zeros_like(log_weight, dtype=spec.accum_dtype))


def _log_pos_count(spec: ContrastSpec) -> Tensor:
    count = spec.pos_count()
    return torch.log(torch.where(count > 0, count, torch.ones_like(count)))


def _eps_in(features, labels, *, epsilon, temperature, base_temperature, contrast_mode, backend, process_group,
            distributed, extra_keys, extra_key_labels, reduction, weight, normalize) -> Tensor:
    """eps-SupInfoNCE's L_in form (see eps_supinfonce_loss): variant "in" with the bias -epsilon - log |P| on
    the anchor's class, minus the variant's log |P_i| (added back as a row term)."""
    _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)

    def build(f, y):
        spec = supcon_spec(f, y, temperature=temperature, base_temperature=base_temperature, variant="in",
                           contrast_mode=contrast_mode, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                           normalize=normalize)
        acc = spec.accum_dtype
        # |P_i| is one number per class (every anchor is a key of its class, self excluded): put it in a table.
        per_class = torch.zeros(spec.num_classes, dtype=acc, device=spec.device)
        per_class = per_class.index_copy(0, spec.anchor_labels, _log_pos_count(spec))
        return dataclasses.replace(spec, den_bias=_positive_bias(spec, -epsilon - per_class))

    def without_log_count(specs, *_):
        c = 1.0 if specs[0].base_temperature is None else specs[0].temperature / specs[0].base_temperature
        return -c * _log_pos_count(specs[0])

    blocks = features.shape[1] if contrast_mode == "all" else 1
    return _blocks_loss([build], (features, labels), blocks, backend=backend, process_group=process_group,
                        adjust=without_log_count, reduction=reduction, weight=weight, distributed=distributed)


@agreed
@deferred_errors
def epsilon_supcon_loss(features, labels=None, *, epsilon=0.1, temperature=0.1, base_temperature=None,
                        contrast_mode="all", normalize=False, extra_keys=None, extra_key_labels=None, backend="auto",
                        process_group=None, reduction="mean", weight=None, distributed="gather") -> Tensor:
    """EpsilonSupCon (Barbano et al., "Unbiased Supervised Contrastive Learning", Eq. 18): SupCon's L_out whose
    denominator weighs every positive e^{-epsilon}: ``L_i = -(c/|P_i|) sum_p [l_ip - log(sum_{p'} exp(l_ip' -
    epsilon) + sum_n exp(l_in))]``, c = temperature / base_temperature (1 when None); 0 for an anchor without
    positives. One denominator per anchor (a denominator bias of -epsilon on its class), unlike
    ``eps_supinfonce_loss``'s one per positive. The authors' 1e-6 inside the log is left out.
    """
    epsilon = _number("epsilon", epsilon, 0.0)
    features = _flatten_views(features)
    _check_finite(features=features)

    def build(f, y):
        spec = supcon_spec(f, y, temperature=temperature, base_temperature=base_temperature,
                           contrast_mode=contrast_mode, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                           normalize=normalize)
        return dataclasses.replace(spec, den_bias=_positive_bias(
            spec, torch.full((spec.num_classes,), -epsilon, dtype=spec.accum_dtype, device=spec.device)))

    return _views_loss(build, features, labels, contrast_mode=contrast_mode, backend=backend,
                       process_group=process_group, distributed=distributed, reduction=reduction, weight=weight)


# ----------------------------------------------------------------------------- DCL / DCLW

@agreed
@deferred_errors
def dcl_loss(features, *, temperature=0.1, weighted=False, sigma=0.5, detach_weight=True, normalize=False,
             backend="auto", process_group=None, distributed="gather", extra_keys=None, reduction="mean",
             weight=None) -> Tensor:
    """Decoupled contrastive loss (Yeh et al.) for ``features [bsz, n_views, D]``, n_views >= 2, bsz >= 2.

    All n_views·bsz views are anchors; a view's positives are the other views of its sample, its denominator
    the views of the other samples (the positives removed): ``L_i = -w_i mean_p l_ip + log sum_n exp(l_in)``,
    mean over anchors (with 2 views: the other view is the one positive).
    ``weighted=True`` is DCLW (2 views only): ``w = 2 - bsz * softmax_b(s_b / sigma)`` per sample (the same
    for both of its views). ``detach_weight=True`` (default; lightly's form): s_b is the cosine of the sample's
    two views and w is a constant to autograd (it steers which pairs matter, it is not trained through).
    ``detach_weight=False``: the authors' reference code: s_b is the dot product of the two views as given
    (the same as the cosine on unit-norm features, or with ``normalize=True``) and the gradient flows through
    w too (an O(bsz) chain through the s_b, added by autograd next to the fused loss).
    ``normalize=True`` L2-normalises every row first. ``extra_keys [E, D]`` (a memory bank): more negatives
    in every anchor's denominator, never anchors.
    """
    features = _views(features, 1 if process_group is not None else 2, "dcl_loss")
    _check_choice("weighted", weighted, (False, True))
    _check_choice("detach_weight", detach_weight, (False, True))
    _check_choice("normalize", normalize, (False, True))
    sigma = _check_sigma(sigma)
    if weighted and features.shape[1] != 2:
        raise ValueError(f"features must have 2 views for weighted=True (DCLW weighs the pair of views), got "
                         f"{features.shape[1]}")
    if weighted:  # DCLW divides a cosine (up to 1) by sigma
        _check_inverse("sigma", sigma, _accum_dtype(features), overflows="cosine / sigma")

    learned = weighted and not detach_weight

    def similarity(f, _):
        """Per sample, [bsz]: what w is computed from: the cosine of its two views (detached), or, learned, the
        dot product of the views as the loss sees them (with its gradient). Ring mode computes it on each
        rank's samples and gathers it: the weight needs every sample's (a softmax over the batch)."""
        acc = _accum_dtype(f)
        first, second = f[:, 0].to(acc), f[:, 1].to(acc)
        if not learned:
            with torch.no_grad():
                return torch.nn.functional.cosine_similarity(first, second, dim=1)
        if normalize:
            first, second = normalize_rows(first, acc), normalize_rows(second, acc)
        return (first * second).sum(1)

    def pair_weight(s):
        """w per sample from the similarities s of the whole batch: 2 - bsz softmax_b(s_b / sigma)."""
        return 2 - s.shape[0] * torch.softmax(s / sigma, dim=0)

    def build(f, _, s=None):
        _views(f, 2, "dcl_loss")  # the (global) batch needs a negative
        spec = supcon_spec(f, temperature=temperature, extra_keys=extra_keys, normalize=normalize)
        weight = None if s is None else pair_weight(s.detach()).repeat(2)  # a constant to the fused loss
        return dataclasses.replace(spec, den_bias=_without_positives(spec), pos_row_weight=weight)

    def weight_gradient(specs, f, _, s):
        """Per anchor row, zero, with the gradient of its loss through w: row i of sample b has the term
        -w_b l_b (one positive, the other view: l_b = s_b / tau), so its derivative in w_b is -l_b, which the
        rows -(w_b - w_b.detach()) l_b.detach() carry (reduced as the loss's rows are)."""
        weight = pair_weight(s)
        tau = specs[0].temperature
        tau = tau.detach().to(s.dtype) if isinstance(tau, Tensor) else tau
        return (-(weight - weight.detach()) * (s.detach() / tau)).repeat(2)

    return _blocks_loss([build], (features, None), features.shape[1], backend=backend, process_group=process_group,
                        adjust=weight_gradient if learned else None, reduction=reduction, weight=weight,
                        distributed=distributed, sample_stat=similarity if weighted else None)


# ----------------------------------------------------------------------------- InfoNCE / MoCo / CLIP

def _pair(name_a: str, a, name_b: str, b) -> None:
    for name, x in ((name_a, a), (name_b, b)):
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point() or x.shape[0] < 1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            dtype = f" {x.dtype}" if isinstance(x, Tensor) else ""
            raise ValueError(f"{name} must be a floating tensor of shape [B, D] with B >= 1, got {shape}{dtype}")
        _check_data(name, x)
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, dtype and device, got "
                         f"{tuple(a.shape)} {a.dtype} {a.device} and {tuple(b.shape)} {b.dtype} {b.device}")
    _check_finite(**{name_a: a, name_b: b})


def _info_nce_spec(query: Tensor, key: Tensor, temperature, queue: Optional[Tensor], in_batch_negatives: bool,
                   tau_float: Optional[float] = None) -> ContrastSpec:
    bsz, device = query.shape[0], query.device
    ids = torch.arange(bsz, device=device)
    keys, key_labels, num_classes = key, ids, bsz
    if queue is not None:  # the queue is one more "class" that no anchor has: never a positive
        keys = append_keys(key, queue.detach())
        key_labels = torch.cat([ids, torch.full((queue.shape[0],), bsz, device=device)])
        num_classes = bsz + 1
    temperature = _check_temperature("temperature", temperature)
    if tau_float is None:
        tau_float = tau_unknown(temperature) if isinstance(temperature, Tensor) else temperature
        if not math.isnan(tau_float):  # NaN: unknown while tracing; the op checks the same range
            _check_inverse("temperature", tau_float, _accum_dtype(query))
    den_bias = None
    if not in_batch_negatives:  # MoCo v1/v2: the positive key and the queue only
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        same = torch.zeros(num_classes, dtype=acc, device=device)
        other = torch.full_like(same, float("-inf"))
        other[bsz:] = 0  # the queue's group
        den_bias = DenominatorBias(ids, key_labels, same, other)
    return ContrastSpec(anchors=query, keys=keys, self_offset=None, anchor_labels=ids, key_labels=key_labels,
                        num_classes=num_classes, mask=None, temperature=temperature, base_temperature=None,
                        no_positive="zero", tau_float=tau_float, den_bias=den_bias)


@agreed
@deferred_errors
def info_nce(query, key, *, temperature=0.1, queue=None, in_batch_negatives=True, symmetric=False,
             backend="auto", process_group=None, distributed="gather", reduction="mean", weight=None,
             normalize=False) -> Tensor:
    """InfoNCE: row i of ``query [B, D]`` has ``key[i]`` as its positive, ``L_i = -l_ii + log sum_j exp(l_ij)``.

    The denominator holds every key and every ``queue [Qn, D]`` row (MoCo v3 / CLIP-row style);
    ``in_batch_negatives=False`` keeps only the positive and the queue (MoCo v1/v2). Queue rows get no
    gradient. ``symmetric=True`` averages the query->key and key->query losses (no queue then).
    Features are used as given, or L2-normalised first (queries, keys, queue) with ``normalize=True``.
    Mean over rows.
    """
    _pair("query", query, "key", key)
    _check_choice("normalize", normalize, (False, True))
    _check_choice("in_batch_negatives", in_batch_negatives, (False, True))
    _check_choice("symmetric", symmetric, (False, True))
    if queue is not None:
        if not isinstance(queue, Tensor) or queue.dim() != 2 or queue.shape[1] != query.shape[1]:
            shape = tuple(queue.shape) if isinstance(queue, Tensor) else type(queue).__name__
            raise ValueError(f"queue must be a tensor of shape [Qn, D] with D = {query.shape[1]}, got {shape}")
        if queue.dtype != query.dtype or queue.device != query.device:
            raise ValueError(f"queue must have the query's dtype and device ({query.dtype}, {query.device}), "
                             f"got {queue.dtype} on {queue.device}")
        _check_finite(queue=queue)
        if symmetric:
            raise ValueError("symmetric=True cannot be combined with a queue (the queue has no anchors)")
    def build(q, k):
        return dataclasses.replace(_info_nce_spec(q, k, temperature, queue, in_batch_negatives), normalize=normalize)

    def build_reverse(q, k):
        return dataclasses.replace(_info_nce_spec(k, q, temperature, None, in_batch_negatives), normalize=normalize)

    names = [("query", "key", "temperature"), ("key", "query", "temperature")]
    losses = _pairs_loss([build, build_reverse] if symmetric else [build], query, key, backend=backend,
                         process_group=process_group, distributed=distributed, names=names,
                         reduction=reduction, weight=weight)
    return 0.5 * (losses[0] + losses[1]) if symmetric else losses[0]


@agreed
@deferred_errors
def clip_loss(image_features, text_features, logit_scale, *, logit_bias=None, backend="auto",
              process_group=None, distributed="gather", reduction="mean", weight=None, normalize=False) -> Tensor:
    """CLIP's symmetric loss with open_clip's ``ClipLoss`` semantics (one process).

    ``logits = logit_scale * image @ text.T``; the loss is the mean of the row-wise (image -> text) and
    column-wise (text -> image) cross-entropies with the diagonal as target. ``logit_scale`` is the
    multiplier as open_clip passes it (already exponentiated): a positive number or a one-element tensor,
    which gets its gradient when it requires grad. The column direction is a second pass with the roles
    swapped (its own per-row LSE = the column LSE of the first), never the full matrix.
    ``logit_bias`` (open_clip adds it to every logit) cannot change a softmax cross-entropy: it is accepted,
    gets a zero gradient, and leaves the loss as it is. ``normalize=True`` L2-normalises every image and text
    row first (open_clip's models do that before the loss).
    """
    _pair("image_features", image_features, "text_features", text_features)
    _check_choice("normalize", normalize, (False, True))
    scale_value = _check_logit_scale(logit_scale)
    traced = math.isnan(scale_value)
    if not traced:
        _check_scale("logit_scale", scale_value, _accum_dtype(image_features), "logit_scale")
    if isinstance(logit_scale, Tensor) and (logit_scale.requires_grad or traced):
        # 1 / s in the features' accumulation dtype: an fp32 scale with fp64 features would otherwise round
        # tau to fp32 (a relative 1e-8 off) before any backend sees it.
        acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
        temperature = 1.0 / logit_scale.reshape(()).to(acc)
    else:
        temperature = 1.0 / scale_value
    _check_logit_bias(logit_bias)

    def image_to_text(image, text):
        return dataclasses.replace(_info_nce_spec(image, text, temperature, None, True, 1.0 / scale_value),
                                   normalize=normalize)

    def text_to_image(image, text):  # the column direction: its per-row LSE is the column LSE of the other
        return dataclasses.replace(_info_nce_spec(text, image, temperature, None, True, 1.0 / scale_value),
                                   normalize=normalize)

    names = [("image_features", "text_features", "logit_scale"), ("text_features", "image_features", "logit_scale")]
    rows, cols = _pairs_loss([image_to_text, text_to_image], image_features, text_features, backend=backend,
                             process_group=process_group, distributed=distributed, names=names,
                             reduction=reduction, weight=weight)
    loss = 0.5 * (rows + cols)
    if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
        loss = loss + 0.0 * logit_bias.sum()  # shift-invariant: a zero gradient, and a graph to carry it
    return loss


# ----------------------------------------------------------------------------- debiased / hard negatives

@agreed
@deferred_errors
def debiased_contrastive_loss(features, *, temperature=0.5, tau_plus=0.1, beta=0.0, normalize=False, backend="auto",
                              process_group=None, distributed="gather", extra_keys=None, reduction="mean",
                              weight=None) -> Tensor:
    """Debiased contrastive loss (Chuang et al.) for ``features [bsz, n_views, D]``, n_views >= 2, bsz >= 2,
    with Robinson et al.'s hard-negative reweighting when ``beta > 0``.

    For each anchor view and each of its positives p (another view of its sample), with the n negatives
    (the views of the other samples: n = n_views·(bsz - 1)):
    ``Ng = max((n * sum_n e^{(1+beta) l_in} / sum_n e^{beta l_in} - tau_plus * n * e^{l_ip}) / (1 - tau_plus),
    n * e^{-1/temperature})`` and ``L_ip = -log(e^{l_ip} / (e^{l_ip} + Ng))``, mean over the (anchor,
    positive) pairs: with 2 views the papers' loss over the 2·bsz anchors, with more each pair of views
    counts as one such anchor (``reduction="none"``: ``[bsz, n_views (n_views - 1)]``, the ordered pairs
    (0, 1), (0, 2), ..., (1, 0), ...; ``weight`` then ``[bsz]``). The clamp assumes L2-normalised features
    (cosine >= -1), as the papers do
    (``normalize=True`` normalises every row first). Computed in log space.
    ``extra_keys [E, D]`` (a memory bank): more negatives (n grows by E), never anchors.
    """
    features = _views(features, 1 if process_group is not None else 2, "debiased_contrastive_loss")
    tau_plus = _number("tau_plus", tau_plus, 0.0, 1.0, closed_high=False)
    beta = _number("beta", beta, 0.0)
    _check_choice("normalize", normalize, (False, True))
    n_views = features.shape[1]

    def debiased(spec):
        # The hard-negative terms exponentiate (1 + beta) l_ij: up to (1 + beta) / temperature for unit features.
        if not math.isnan(spec.tau_float):  # NaN: unknown while tracing; the op checks the same range
            _check_scale("beta", (1.0 + beta) / spec.tau_float, spec.accum_dtype, "(1 + beta) / temperature")
        return dataclasses.replace(spec, variant="debiased", tau_plus=tau_plus, beta=beta)

    def build(f, _):
        _views(f, 2, "debiased_contrastive_loss")  # the (global) batch needs a negative
        spec = supcon_spec(f, temperature=temperature, extra_keys=extra_keys, normalize=normalize)
        return debiased(dataclasses.replace(spec, den_bias=_without_positives(spec)))

    if n_views == 2:
        builds = [build]
    else:  # one spec per ordered pair of views (u, v): view u's anchors, view v's row of the sample as positive
        pairs = [(u, v) for u in range(n_views) for v in range(n_views) if u != v]
        builds = [functools.partial(_pair_spec, u=u, v=v, temperature=temperature, normalize=normalize,
                                    extra_keys=extra_keys, finish=debiased) for u, v in pairs]
    # ring mode: view u's rows as anchors, every view as keys
    places = None if n_views == 2 else [functools.partial(_view_pair_rows, u=u, v=None) for u, _ in pairs]
    return _blocks_loss(builds, (features, None), 2 if n_views == 2 else 1, backend=backend,
                        process_group=process_group, reduction=reduction, weight=weight, distributed=distributed,
                        places=places)


# ----------------------------------------------------------------------------- BCL

@agreed
@deferred_errors
def bcl_loss(features, labels, *, temperature=0.1, class_centers=None, backend="auto", process_group=None,
             distributed="gather",
             extra_keys=None, extra_key_labels=None, reduction="mean", weight=None, normalize=False) -> Tensor:
    """Balanced contrastive loss (Zhu et al., BCL) for ``features [bsz, n_views, D]`` and ``labels [bsz]``.

    SupCon (L_out, scale 1) whose denominator weighs each key by one over the batch count of its class,
    minus one for the anchor's own class (self is not in it): ``b_ij = -log(cnt[y_j] - [y_j == y_i])``,
    from a class histogram, never a mask. ``class_centers [C, D]`` (optional) join as keys, center c with
    label c (labels must then be integers in [0, C)); they count in the histogram, are positives of their
    class and get gradients. Mean over the view rows; an anchor without positives has loss 0.
    ``extra_keys`` / ``extra_key_labels`` (a memory bank): labelled keys after the centers, counted in the
    histogram like every key, never anchors. ``normalize=True`` L2-normalises every row (views, centers, bank)
    first (the authors normalise their centers).
    """
    features = _flatten_views(features)
    _check_finite(features=features)
    bsz = features.shape[0]
    if labels is None:
        raise ValueError("labels must be given for bcl_loss (one class per sample)")
    labels = _check_labels(labels, bsz, features.device)
    extra_labels = None
    if class_centers is not None:
        num_centers = class_centers.shape[0] if isinstance(class_centers, Tensor) and class_centers.dim() == 2 else 0
        extra_labels = torch.arange(num_centers, device=features.device)
        # Checked here with their own name (supcon_spec would call them extra_keys).
        _extra_keys(class_centers, extra_labels, features, name="class_centers", rows="C")
        message = (f"labels must be integers in [0, C) = [0, {num_centers}) when class_centers are given "
                   "(center c belongs to class c)")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(message)
        labels = require(labels, (labels < 0) | (labels >= num_centers), message)
    if extra_keys is not None:  # a memory bank: labelled keys after the centers
        extra_keys, extra_key_labels = _extra_keys(extra_keys, extra_key_labels, features)
    elif extra_key_labels is not None:
        raise ValueError("extra_key_labels was given without extra_keys")
    if class_centers is not None and extra_keys is None:
        extra_keys, extra_key_labels = class_centers, extra_labels
    elif class_centers is not None:
        center_labels, extra_key_labels = _common_labels(extra_labels, extra_key_labels)
        extra_keys = torch.cat([class_centers, extra_keys])
        extra_key_labels = torch.cat([center_labels, extra_key_labels])

    def build(f, y):
        spec = supcon_spec(f, y, temperature=temperature, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                           normalize=normalize)
        acc, key_labels = spec.accum_dtype, spec.key_labels
        count = torch.zeros(spec.num_classes, dtype=acc, device=spec.device)
        count.index_add_(0, key_labels, torch.ones(key_labels.shape[0], dtype=acc, device=spec.device))
        # A class whose count is (or drops to) 0 has no key in that role: its entry is never used.
        same = torch.where(count > 1, -torch.log(count.clamp(min=2) - 1), 0.0)
        other = torch.where(count > 0, -torch.log(count.clamp(min=1)), 0.0)
        return dataclasses.replace(spec, den_bias=DenominatorBias(spec.anchor_labels, key_labels, same, other))

    return _views_loss(build, features, labels, backend=backend, process_group=process_group,
                       distributed=distributed, reduction=reduction, weight=weight)


# ----------------------------------------------------------------------------- class-conditional InfoNCE

@agreed
@deferred_errors
def spread_loss(features, labels, *, temperature=0.5, normalize=False, backend="auto", process_group=None,
                distributed="gather",
                extra_keys=None, extra_key_labels=None, reduction="mean", weight=None) -> Tensor:
    """Class-conditional InfoNCE, the "spread" term of Chen et al. 2022 ("Perfectly Balanced"), as the
    authors' code computes it, for ``features [bsz, n_views, D]``, n_views >= 2, and ``labels [bsz]``.

    For each pair of views u > v, view u's rows are the anchors and view v's rows the keys: anchor i's
    positive is its own sample's row k_i, its denominator the keys of its class, the positive included:
    ``L_i = -l_ii + log sum_{j: y_j = y_i} exp(l_ij)`` with ``l_ij = z_{u,i} . z_{v,j} / temperature``;
    the loss is the mean over anchors, averaged over the n_views (n_views - 1) / 2 pairs (with 2 views:
    view 1 against view 0 only). ``normalize=True`` L2-normalises every row first (the authors' ``lc_norm``).
    ``extra_keys`` / ``extra_key_labels`` (a memory bank): keys of every pair, never positives, in the
    denominators of their class. ``symmetric_spread_loss`` is the form with every view as an anchor.
    ``reduction="none"`` gives ``[bsz]`` with 2 views (view 1's rows), ``[bsz, n_pairs]`` with more (pairs in
    the order (1, 0), (2, 0), (2, 1), ...); ``weight`` is ``[bsz]`` (every row of the sample).
    """
    features = _views(features, 1, "spread_loss")
    if labels is None:
        raise ValueError("labels must be given for spread_loss (one class per sample: its denominator's keys)")
    labels = _check_labels(labels, features.shape[0], features.device)
    _check_choice("normalize", normalize, (False, True))
    extra_keys, extra_key_labels = _bank(extra_keys, extra_key_labels, features)
    n_views = features.shape[1]
    pairs = [(u, v) for u in range(1, n_views) for v in range(u)]
    builds = [functools.partial(_spread_pair_spec, u=u, v=v, temperature=temperature, normalize=normalize,
                                extra_keys=extra_keys, extra_key_labels=extra_key_labels) for u, v in pairs]
    places = [functools.partial(_view_pair_rows, u=u, v=v) for u, v in pairs]  # ring mode: view u's rows, view v's
    return _blocks_loss(builds, (features, labels), 1, backend=backend, process_group=process_group,
                        reduction=reduction, weight=weight, distributed=distributed, places=places)


# ----------------------------------------------------------------------------- more of the family

def _views(features, min_bsz: int, loss: str) -> Tensor:
    """[bsz, n_views, D] with n_views >= 2 and bsz >= min_bsz."""
    features = _flatten_views(features)
    _check_finite(features=features)
    if features.shape[1] < 2 or features.shape[0] < min_bsz:
        raise ValueError(f"features must be [bsz, n_views, D] with n_views >= 2 and bsz >= {min_bsz} for {loss}, "
                         f"got shape {tuple(features.shape)}")
    return features


def _bank(extra_keys, extra_key_labels, features):
    if extra_keys is not None:
        return _extra_keys(extra_keys, extra_key_labels, features)
    if extra_key_labels is not None:
        raise ValueError("extra_key_labels was given without extra_keys")
    return None, None


def _tau(temperature, acc: torch.dtype):
    """(temperature as the spec takes it, its value: NaN while tracing, when the op checks the range)."""
    temperature = _check_temperature("temperature", temperature)
    tau_float = tau_unknown(temperature) if isinstance(temperature, Tensor) else temperature
    if not math.isnan(tau_float):
        _check_inverse("temperature", tau_float, acc)
    return temperature, tau_float


def _blocks_loss(builds, tensors: tuple, blocks: int, *, backend: str, process_group, adjust=None,
                 reduction: str = "mean", weight=None, distributed: str = "gather", sample_stat=None,
                 places=None) -> Tensor:
    """The loss over ``build(*tensors) -> spec`` for every build (specs with as many anchor rows each), each
    spec's anchors being ``blocks`` blocks of one row per sample (block-major), on this process's batch or on
    the global batch of ``process_group``: gather mode (the per-sample ``tensors`` gathered; each rank computes
    its own rows of every block) or ring mode (one ring per spec; the feature tensors stay home or travel, see
    distributed.ring_blocks, whose ``places`` say which of this rank's rows are each spec's anchors and keys:
    by default the views of ``tensors[0]`` are the keys and the anchors their leading rows). ``reduction``
    over all the specs' rows: "mean" (every spec has the same rows and weights, so the mean of the specs'
    means), "sum", or "none": ``[bsz, len(builds) * blocks]`` (``[bsz]`` when that is one column).
    ``weight``: ``[bsz]``, or ``[bsz, blocks]`` (per block) for a single spec.
    ``sample_stat(*tensors) -> [bsz, ...]``: per-sample values computed from the features (on the gathered
    batch in gather mode, on this rank's samples and then gathered in ring mode), passed to every build and
    to ``adjust`` as their last argument. ``adjust(specs, *tensors[, stat]) -> [Na]`` (the first spec's rows,
    global): terms added to the rows and reduced with them: constants of the batch's metadata, or zero-valued
    terms carrying a gradient the specs cannot, through the stat. They must not read the features
    themselves (ring mode passes placeholders); every rank computes all rows from the gathered stat, whose
    gather's backward makes their gradient world_size x this rank's share."""
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("distributed", distributed, ("gather", "ring"))
    _not_compiled(process_group)
    bsz, device = tensors[0].shape[0], tensors[0].device
    shapes = [(bsz,)] + ([(bsz, blocks)] if blocks > 1 and len(builds) == 1 else [])
    weight = _check_weight(weight, shapes, device, "one per sample" + (", or per view" if len(shapes) > 1 else ""))

    def reduced(spec, w):  # weights get no gradient of their own with a process group (as run_rows)
        return _reduced(spec, reduction, w if w is None or process_group is None else w.detach(), blocks)

    world, ranges = 1, None
    if process_group is None:
        args = tensors + (() if sample_stat is None else (sample_stat(*tensors),))
        specs = [reduced(build(*args), weight) for build in builds]
        results = [compiled.run(spec, backend) for spec in specs]
    elif distributed == "ring":
        from . import distributed as dist_mode

        run = dist_mode.ring_blocks(builds, tensors, places, group=process_group, backend=backend,
                                    sample_stat=sample_stat, reduce=reduced, weight=weight)
        results, specs, args = run.results, run.specs, tuple(run.inputs)
        ranges = dist_mode.view_ranges(run.batch, blocks)
        world = torch.distributed.get_world_size(process_group)
    else:
        from . import distributed as dist_mode

        batch = dist_mode.gather_batch(process_group, *tensors, weight)
        tensors, weight = tuple(batch.tensors[:-1]), batch.tensors[-1]
        args = tensors + (() if sample_stat is None else (sample_stat(*tensors),))
        specs = [reduced(build(*args), weight) for build in builds]
        ranges = dist_mode.view_ranges(batch, blocks)
        world = torch.distributed.get_world_size(process_group)
        results = [dist_mode.run_rows(spec, ranges, process_group, backend) for spec in specs]
    adjusted = None
    if adjust is not None:
        spec = specs[0]
        adjusted = adjust(specs, *args)
        if spec.row_weight is not None:
            adjusted = adjusted * spec.row_weight.to(adjusted.dtype)
        if reduction != "none":
            has_pos = spec.pos_count() > 0
            adjusted = adjusted.sum() / mean_divisor(spec, has_pos)
        elif ranges is not None:  # this rank's rows, with the gradient scale of run_rows' rows
            adjusted = torch.cat([adjusted[start:stop] for start, stop in ranges])
            adjusted = world * adjusted - ((world - 1) * adjusted).detach()
    if reduction != "none":
        loss = results[0] if len(results) == 1 else torch.stack(results).sum()
        loss = loss / len(results) if reduction == "mean" else loss
        return loss if adjusted is None else loss + adjusted
    if adjusted is not None:
        results[0] = results[0] + adjusted
    rows = torch.cat([r.reshape(blocks, -1).transpose(0, 1) for r in results], dim=1)  # [bsz, specs * blocks]
    return rows[:, 0] if rows.shape[1] == 1 else rows


def _view_rows(f: Tensor, view: int) -> Tensor:
    return f[:, view]


def _view_pair_rows(f: Tensor, *_, u: int, v: Optional[int]) -> tuple[Tensor, Tensor]:
    """Ring mode's rows of a spec with view u as anchors and view v as keys (every view, view-major, when None)."""
    return _view_rows(f, u), (f.transpose(0, 1).reshape(-1, f.shape[-1]) if v is None else _view_rows(f, v))


def _unit_rows(x: Tensor, acc: torch.dtype) -> Tensor:
    """normalize_rows(x, acc); rows that are all one row (stride 0: ring mode builds on such placeholders) are
    normalised once and expanded, never written out."""
    if x.dim() == 2 and x.shape[0] > 1 and x.stride(0) == 0:
        return normalize_rows(x[:1], acc).expand(x.shape)
    return normalize_rows(x, acc)


def _spread_pair_spec(f, y, *, u: int, v: int, temperature, normalize: bool, extra_keys, extra_key_labels
                      ) -> ContrastSpec:
    """Anchors: view u; keys: view v (then the bank); positive: the anchor's own sample; denominator: the
    keys of the anchor's class (b = 0 there, -inf elsewhere)."""
    bsz, device = f.shape[0], f.device
    acc = _accum_dtype(f)
    temperature, tau_float = _tau(temperature, acc)
    ids = torch.arange(bsz, device=device)
    keys, key_labels = _view_rows(f, v), ids
    if extra_keys is not None:  # one class numbering for samples and bank, compared as torch.eq
        y = torch.cat(_common_labels(y, extra_key_labels))
        keys = append_keys(keys, extra_keys)
        key_labels = torch.cat([ids, torch.full((extra_keys.shape[0],), bsz, device=device)])  # never positives
    classes, num_classes = dense_ids(y)
    same = torch.zeros(num_classes, dtype=acc, device=device)
    den_bias = DenominatorBias(classes[:bsz], classes, same, torch.full_like(same, float("-inf")))
    return ContrastSpec(anchors=_view_rows(f, u), keys=keys, self_offset=None, anchor_labels=ids,
                        key_labels=key_labels, num_classes=bsz + 1, mask=None, temperature=temperature,
                        base_temperature=None, no_positive="zero", normalize=normalize, tau_float=tau_float,
                        den_bias=den_bias)


def _pair_spec(f, _, *, u: int, v: int, temperature, normalize: bool, extra_keys, finish) -> ContrastSpec:
    """Anchors: view u; keys: every view (then ``extra_keys``); positive: the anchor's sample in view v;
    denominator: the other samples' views and the extra keys (its own sample's views out). ``finish(spec)``
    sets the row formula."""
    bsz, n_views, dim = f.shape
    device, acc = f.device, _accum_dtype(f)
    temperature, tau_float = _tau(temperature, acc)
    ids = torch.arange(bsz, device=device)
    keys = f.transpose(0, 1).reshape(n_views * bsz, dim)
    none = torch.full((bsz,), bsz, device=device)  # a class no anchor has
    key_labels = torch.cat([ids if view == v else none for view in range(n_views)])
    groups = ids.repeat(n_views)
    if extra_keys is not None:
        extra_keys, _ = _extra_keys(extra_keys, None, f, labelled=False)
        keys = append_keys(keys, extra_keys)
        extra = torch.full((extra_keys.shape[0],), bsz, device=device)
        key_labels, groups = torch.cat([key_labels, extra]), torch.cat([groups, extra])
    same = torch.full((bsz + 1,), float("-inf"), dtype=acc, device=device)
    den_bias = DenominatorBias(ids, groups, same, torch.zeros_like(same))
    return finish(ContrastSpec(anchors=_view_rows(f, u), keys=keys, self_offset=None, anchor_labels=ids,
                               key_labels=key_labels, num_classes=bsz + 1, mask=None, temperature=temperature,
                               base_temperature=None, no_positive="zero", normalize=normalize,
                               tau_float=tau_float, den_bias=den_bias))


@agreed
@deferred_errors
def symmetric_spread_loss(features, labels, *, temperature=0.5, normalize=False, backend="auto", process_group=None,
                          distributed="gather",
                          extra_keys=None, extra_key_labels=None, reduction="mean", weight=None) -> Tensor:
    """Class-conditional InfoNCE with every view as an anchor (NT-Xent restricted to the anchor's class),
    for ``features [bsz, n_views, D]``, n_views >= 2: a view's positives are the other views of its sample,
    its denominator every other view of its class (self excluded, the positives included):
    ``L_i = -mean_p l_ip + log sum_{j != i: y_j = y_i} exp(l_ij)``, mean over the n_views·bsz anchors.

    This was this package's ``spread_loss`` before it followed the authors' code (``spread_loss``: view u
    against view v < u only). It is kept under its own name because it is symmetric in the views, as
    SimCLR's NT-Xent is: every view row is both an anchor and a key of every other row (with 2 views, 2·bsz
    anchors against 2·bsz - 1 keys each, where the authors' form has bsz against bsz), so no view is
    privileged and a batch gives about four times the pairs. The two differ on the same batch.
    ``extra_keys`` / ``extra_key_labels`` (a memory bank): never positives, in the denominators of their class.
    """
    features = _views(features, 1, "symmetric_spread_loss")
    if labels is None:
        raise ValueError("labels must be given for symmetric_spread_loss (one class per sample: its denominator's "
                         "keys)")
    labels = _check_labels(labels, features.shape[0], features.device)
    _check_choice("normalize", normalize, (False, True))
    extra_keys, extra_key_labels = _bank(extra_keys, extra_key_labels, features)
    n_views = features.shape[1]

    def build(f, y):
        bsz = f.shape[0]
        if extra_keys is not None:  # one class numbering for samples and bank, compared as torch.eq
            y = torch.cat(_common_labels(y, extra_key_labels))
        ids, num_classes = dense_ids(y)
        spec = supcon_spec(f, temperature=temperature, extra_keys=extra_keys, normalize=normalize)  # bank: no positive
        classes = torch.cat([ids[:bsz].repeat(n_views), ids[bsz:]])
        same = torch.zeros(num_classes, dtype=spec.accum_dtype, device=spec.device)
        den_bias = DenominatorBias(classes[: spec.num_anchors], classes, same, torch.full_like(same, float("-inf")))
        return dataclasses.replace(spec, den_bias=den_bias)

    return _blocks_loss([build], (features, labels), n_views, backend=backend, process_group=process_group,
                        reduction=reduction, weight=weight, distributed=distributed)


def _universum_views(universum, features: Tensor) -> Tensor:
    """The universum as [bsz, n_views, D] (given so, or view-major [n_views·bsz, D] as the authors stack it)."""
    bsz, n_views, dim = features.shape
    if isinstance(universum, Tensor) and universum.dim() == 2 and tuple(universum.shape) == (bsz * n_views, dim):
        universum = universum.reshape(n_views, bsz, dim).transpose(0, 1)
    if not isinstance(universum, Tensor) or tuple(universum.shape) != (bsz, n_views, dim):
        shape = tuple(universum.shape) if isinstance(universum, Tensor) else type(universum).__name__
        raise ValueError(f"universum must be a tensor of shape [n_views * bsz, D] = [{n_views * bsz}, {dim}] "
                         f"(view-major, one universum row per view row) or [bsz, n_views, D], got {shape}")
    _check_data("universum", universum)
    if universum.dtype != features.dtype or universum.device != features.device:
        raise ValueError(f"universum must have the features' dtype and device ({features.dtype}, {features.device}), "
                         f"got {universum.dtype} on {universum.device}")
    _check_finite(universum=universum)
    return universum


@agreed
@deferred_errors
def unicon_loss(features, universum, labels, *, temperature=0.1, base_temperature=None, contrast_mode="all",
                normalize=False, backend="auto", process_group=None, distributed="gather", reduction="mean",
                weight=None) -> Tensor:
    """UniCon (Han et al., "Universum-inspired Supervised Contrastive Learning"), as the authors' code computes it.

    ``features [bsz, n_views, D]``, ``labels [bsz]``, ``universum`` one row per view row: ``[n_views·bsz, D]``
    stacked view-major as the authors do (row v·bsz + b: the mixup of view v of sample b with a sample of
    another class, built by the user), or ``[bsz, n_views, D]``. The keys are the universum rows only; universum
    row j carries the label of the sample it was mixed from, and the anchor's own row's universum (j = i) is
    out: ``L_i = -(c/|P_i|) sum_{p in P_i} [l_ip - log sum_{j != i} exp(l_ij)]``, ``l_ij = z_i . u_j / tau``,
    P_i the universum rows of the anchor's class (j != i), c = temperature / base_temperature (1 when None;
    the authors' module has 0.1 / 0.1). Anchors: every view row ("all") or view 0 ("one"); mean over anchors,
    0 for an anchor without positives (the authors' code divides 0 by 0 there). The universum gets gradients.
    """
    features = _flatten_views(features)
    _check_finite(features=features)
    universum = _universum_views(universum, features)
    if labels is None:
        raise ValueError("labels must be given for unicon_loss (the universum's positives are by label)")
    labels = _check_labels(labels, features.shape[0], features.device)
    _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
    _check_choice("normalize", normalize, (False, True))

    def build(f, y, u):
        spec = supcon_spec(f, y, temperature=temperature, base_temperature=base_temperature,
                           contrast_mode=contrast_mode, normalize=normalize)
        keys = u.transpose(0, 1).reshape(-1, u.shape[-1])  # view-major, as the views
        anchors = spec.keys if contrast_mode == "all" else spec.keys[: f.shape[0]]
        return dataclasses.replace(spec, anchors=anchors, keys=keys)  # self_offset 0: universum row i is out

    def rows(f, y, u):  # ring mode: the anchor views stay home, the universum rows are the keys that travel
        anchors = f.transpose(0, 1).reshape(-1, f.shape[-1])[: blocks * f.shape[0]]
        return anchors, u.transpose(0, 1).reshape(-1, u.shape[-1])

    blocks = features.shape[1] if contrast_mode == "all" else 1
    return _blocks_loss([build], (features, labels, universum), blocks, backend=backend, process_group=process_group,
                        reduction=reduction, weight=weight, distributed=distributed, places=[rows])


@agreed
@deferred_errors
def suncet_loss(features, labels, *, temperature=0.1, contrast_mode="all", normalize=False, support=None,
                support_labels=None, backend="auto", process_group=None, distributed="gather", reduction="mean",
                weight=None) -> Tensor:
    """SuNCEt (Assran et al., "Supervision Accelerates Pre-training in Contrastive Semi-Supervised Learning"):
    ``L_i = -log sum_{p in P_i} softmax_i(p) = log sum_{j != i} exp(l_ij) - log sum_{p in P_i} exp(l_ip)``,
    minus the log of the summed probability of the keys of the anchor's class, ``l_ij = z_i . z_j / tau``.

    The keys (the support set) are the batch's view rows (self excluded) and the labelled ``support [S, D]``
    rows (``support_labels [S]``; never anchors). It is SupCon's L_in without its log |P_i| term:
    ``L_suncet_i = L_in_i - log |P_i|``, a constant of the labels, so the gradients are L_in's and the loss is
    computed as L_in's spec minus the mean of log |P_i|. ``features [bsz, n_views, D]`` (the authors: one view,
    normalised: ``normalize=True``); anchors every view row ("all") or view 0 ("one"); mean over anchors, 0 for
    an anchor without positives (the authors' code gives -log 0 = inf there).
    """
    features = _flatten_views(features)
    _check_finite(features=features)
    if labels is None:
        raise ValueError("labels must be given for suncet_loss (the positives are the keys of the anchor's class)")
    labels = _check_labels(labels, features.shape[0], features.device)
    _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
    _check_choice("normalize", normalize, (False, True))
    if support is not None:
        if support_labels is None:
            raise ValueError("support needs support_labels: one label per support row, compared with the labels")
        try:
            support, support_labels = _extra_keys(support, support_labels, features, name="support", rows="S")
        except ValueError as err:  # the shared check calls the labels by supcon_loss's name
            raise ValueError(str(err).replace("extra_key_labels", "support_labels")) from None
    elif support_labels is not None:
        raise ValueError("support_labels was given without support")

    def build(f, y):
        return supcon_spec(f, y, temperature=temperature, contrast_mode=contrast_mode, normalize=normalize,
                           variant="in", extra_keys=support, extra_key_labels=support_labels)

    def without_log_count(specs, *_):
        """-log |P_i| per row (0 without positives): L_in's rows minus these are SuNCEt's."""
        pos_count = specs[0].pos_count()
        return -torch.log(torch.where(pos_count > 0, pos_count, torch.ones_like(pos_count)))

    blocks = features.shape[1] if contrast_mode == "all" else 1
    return _blocks_loss([build], (features, labels), blocks, backend=backend, process_group=process_group,
                        adjust=without_log_count, reduction=reduction, weight=weight, distributed=distributed)


# ----------------------------------------------------------------------------- PaCo / GPaCo

def _class_index_labels(labels: Tensor, classes: int, what: str) -> None:
    """Labels that index a table of ``classes`` rows (the class centers): integers in [0, classes)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers in [0, {classes}) for {what} (each indexes its class center), "
                         f"got dtype {labels.dtype}")
    if not compiling() and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}) for {what} (one class center per class), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")


@agreed
@deferred_errors
def paco_loss(features, labels, class_centers, *, alpha=1.0, beta=1.0, gamma=1.0, temperature=0.2,
              supervised_temperature=None, base_temperature=None, label_smoothing=0.0, logit_offsets=None,
              contrast_mode="one", normalize=False, extra_keys=None, extra_key_labels=None, backend="auto",
              process_group=None, reduction="mean", weight=None, distributed="gather") -> Tensor:
    """Parametric contrastive loss (PaCo, Cui et al.; GPaCo's label smoothing): SupCon whose keys are the views,
    a labelled queue (``extra_keys``) and one learnable center per class, each center a key of every anchor.

    With ``l_ij = q_i . k_j / temperature`` for the view and queue keys (self excluded) and
    ``s_ik = (q_i . c_k + o_k) / supervised_temperature`` for the centers (``o = logit_offsets [C]``, PaCo-LT's
    log class prior; constants), the denominator is ``D_i = sum_k exp(s_ik) + gamma sum_j exp(l_ij)`` and
    ``L_i = -c / W_i [sum_k m_ik (s_ik - log D_i) + alpha sum_{j: y_j = y_i} (l_ij - log D_i)]``, where
    ``m_ik = beta (1 - e)`` for k = y_i and ``beta e / (C - 1)`` else (``e = label_smoothing``),
    ``W_i = beta + alpha |P_i|`` and ``c = temperature / base_temperature`` (1 when None).
    ``labels`` are integers in [0, C) (the row of ``class_centers [C, D]``); ``supervised_temperature=None``
    means ``temperature`` (the authors' default is 1.0); anchors are view 0 (``contrast_mode="one"``, the
    authors' query) or every view (``"all"``). ``normalize=True`` L2-normalises the views and queue rows,
    never the centers (a linear classifier's weights). With beta = 0 an anchor without a positive has loss 0
    (the authors' code divides 0 by 0 there).
    One fused pass: the centers are keys scaled by ``temperature / supervised_temperature``, gamma and the
    offsets a per-key denominator bias, the positive weights a per-row scale of the fused positive sum plus
    an O(N D) term for the center positives (the smoothing's sum over every center is ``q_i . sum_k c_k``).
    """
    features = _flatten_views(features)
    _check_finite(features=features)
    if labels is None:
        raise ValueError("labels must be given for paco_loss (each anchor's positive center is its class's)")
    labels = _check_labels(labels, features.shape[0], features.device)
    alpha, beta, gamma = (_number(name, value, 0.0) for name, value in (("alpha", alpha), ("beta", beta),
                                                                         ("gamma", gamma)))
    if alpha == 0 and beta == 0:
        raise ValueError("alpha and beta must not both be 0 (no positive would remain)")
    smoothing = _number("label_smoothing", label_smoothing, 0.0, 1.0)
    _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
    _check_choice("normalize", normalize, (False, True))
    if not isinstance(class_centers, Tensor) or class_centers.dim() != 2 or class_centers.shape[0] < 1:
        shape = tuple(class_centers.shape) if isinstance(class_centers, Tensor) else type(class_centers).__name__
        raise ValueError(f"class_centers must be a tensor of shape [C, D] with C >= 1, got {shape}")
    classes = class_centers.shape[0]
    class_centers, _ = _extra_keys(class_centers, None, features, name="class_centers", rows="C", labelled=False)
    if smoothing > 0 and classes < 2:
        raise ValueError("label_smoothing > 0 needs at least 2 class centers (it moves mass to the other classes)")
    _class_index_labels(labels, classes, "paco_loss")
    acc = _accum_dtype(features)
    if supervised_temperature is None:
        supt = None
    else:
        supt = _number("supervised_temperature", supervised_temperature, 0.0)
        if supt == 0:
            raise ValueError("supervised_temperature must be > 0")
        _check_inverse("supervised_temperature", supt, acc)
    if logit_offsets is not None:
        if not isinstance(logit_offsets, Tensor) or tuple(logit_offsets.shape) != (classes,):
            shape = tuple(logit_offsets.shape) if isinstance(logit_offsets, Tensor) else type(logit_offsets).__name__
            raise ValueError(f"logit_offsets must be a tensor of shape [C] with C = {classes}, got {shape}")
        _check_data("logit_offsets", logit_offsets)
        if not logit_offsets.is_floating_point():
            raise ValueError(f"logit_offsets must be floating, got dtype {logit_offsets.dtype}")
        _check_finite(logit_offsets=logit_offsets)
        logit_offsets = logit_offsets.detach().to(device=features.device, dtype=acc)
    bank, bank_labels = _bank(extra_keys, extra_key_labels, features)
    blocks = features.shape[1] if contrast_mode == "all" else 1

    if (logit_offsets is not None and supt is None and isinstance(temperature, Tensor)
            and temperature.requires_grad):
        raise ValueError("logit_offsets with a learned temperature needs a supervised_temperature (a number): the "
                         "offsets' share o_k / temperature would get no gradient")

    def build(f, y, _=None):
        _class_index_labels(y, classes, "paco_loss")
        views, queue, centers = f, bank, class_centers
        if normalize:  # the views and the queue only: the centers are used as given
            views = _unit_rows(f.reshape(-1, f.shape[-1]), acc).reshape(f.shape)
            queue = None if bank is None else normalize_rows(bank, acc)
            centers = centers.to(acc)
        tau, _ = _tau(temperature, acc)
        # A center key k_c = c tau / supt gives q . k_c / tau = q . c / supt: one temperature for every key.
        center_keys = centers if supt is None else centers * (tau / supt)
        center_labels = (torch.arange(classes, device=y.device, dtype=y.dtype) if beta > 0
                         else torch.full((classes,), -1, device=y.device, dtype=y.dtype))  # -1: no label's
        if queue is None:
            more, more_labels = center_keys, center_labels
        else:
            common = torch.promote_types(y.dtype, bank_labels.dtype)  # compared by value, never truncated
            more, more_labels = torch.cat([queue, center_keys]), torch.cat([bank_labels.to(common),
                                                                            center_labels.to(common)])
        spec = supcon_spec(views, y, temperature=temperature, base_temperature=base_temperature,
                           contrast_mode=contrast_mode, extra_keys=more, extra_key_labels=more_labels)
        spec_acc, device = spec.accum_dtype, spec.device
        # Denominator bias: group 0 holds the views and queue (log gamma), group 1 + k center k (its offset).
        key_groups = torch.zeros(spec.num_keys, dtype=torch.long, device=device)
        key_groups[spec.num_keys - classes:] = torch.arange(1, classes + 1, device=device)
        same = torch.zeros(classes + 1, dtype=spec_acc, device=device)
        same[0] = math.log(gamma) if gamma > 0 else float("-inf")
        other = torch.zeros(classes + 1, dtype=spec_acc, device=device)
        if logit_offsets is not None:  # o_k / supervised_temperature (a constant to autograd)
            inv = 1.0 / (spec.temperature.detach().to(spec_acc) if isinstance(spec.temperature, Tensor)
                         else spec.temperature) if supt is None else 1.0 / supt
            other[1:] = logit_offsets.to(spec_acc) * inv
        bias = DenominatorBias(torch.zeros(spec.num_anchors, dtype=torch.long, device=device), key_groups, same,
                               other)
        row_weight = None
        if beta > 0:  # the fused sum weighs every positive alpha / W_i; the center's own weight is added below
            count = spec.pos_count()
            row_weight = alpha * count / (alpha * (count - 1) + beta)
        return dataclasses.replace(spec, den_bias=bias, pos_row_weight=row_weight)

    def anchor_rows(f, _=None):
        """The anchors as the fused loss sees them (view-major, normalised with ``normalize``) and, in ring mode,
        the keys they are the leading rows of (the views; the queue and centers are extra keys)."""
        views = f.transpose(0, 1).reshape(-1, f.shape[-1])
        return None, _unit_rows(views, acc) if normalize else views

    def center_dots(f, y):
        """Per sample and anchor view, [bsz, blocks, 2]: q . c_y (its own class's center) and q . sum_k c_k,
        from this process's (or rank's) features: the O(N D) part of the center positives."""
        q = anchor_rows(f)[1][: blocks * f.shape[0]].to(acc).reshape(blocks, f.shape[0], -1).transpose(0, 1)
        centers = class_centers.to(acc)
        return torch.stack([(q * centers[y.long()][:, None]).sum(-1), q @ centers.sum(0)], dim=-1)

    def center_positives(specs, f, y, dots):
        """What the fused rows lack of the center positives, per anchor row: -c / W_i times
        (m_own - m_other - alpha) s_iy + m_other sum_k s_ik (offsets included), from the dot products."""
        spec = specs[0]
        spec_acc = spec.accum_dtype
        own, every = dots.to(spec_acc).transpose(0, 1).reshape(-1, 2).unbind(1)  # view-major anchor rows
        tau = spec.temperature
        inv = (1.0 / tau if supt is None else 1.0 / supt)
        y_rows = y.repeat(blocks)
        other_share = smoothing / (classes - 1) if classes > 1 else 0.0
        m_own, m_other = beta * (1.0 - smoothing), beta * other_share
        term = (m_own - m_other - alpha) * own + m_other * every
        if logit_offsets is not None:
            offsets = logit_offsets.to(spec_acc)
            term = term + (m_own - m_other) * offsets[y_rows] + m_other * offsets.sum()
        count = spec.pos_count()
        c = 1.0 if spec.base_temperature is None else tau / spec.base_temperature
        return -c * inv * term / (alpha * (count - 1) + beta)

    positives = beta > 0
    return _blocks_loss([build], (features, labels), blocks, backend=backend, process_group=process_group,
                        adjust=center_positives if positives else None, reduction=reduction, weight=weight,
                        distributed=distributed, sample_stat=center_dots if positives else None,
                        places=[anchor_rows])


# ----------------------------------------------------------------------------- TSC

def _labelled_keys(name: str, keys, labels, query: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Optional [n, D] keys with their [n] labels (both or neither), detached (no gradient, as the authors')."""
    label_name = name[:-1] + "_labels" if name.endswith("s") else name + "_labels"
    if keys is None:
        if labels is not None:
            raise ValueError(f"{label_name} was given without {name}")
        return None, None
    if labels is None:
        raise ValueError(f"{name} needs {label_name}: one label per row")
    try:
        keys, labels = _extra_keys(keys, labels, query[:, None], name=name, rows="n")
    except ValueError as err:  # the shared check calls the labels by supcon_loss's name
        raise ValueError(str(err).replace("extra_key_labels", label_name)) from None
    return keys.detach(), labels


@agreed
@deferred_errors
def tsc_loss(query, key, labels, *, queue=None, queue_labels=None, targets=None, target_labels=None,
             target_weight=1.0, temperature=0.07, normalize=True, backend="auto", process_group=None,
             reduction="mean", weight=None, distributed="gather") -> Tensor:
    """Targeted supervised contrastive loss (TSC, Li et al., the authors' MoCo form). Anchor ``query[i]``'s keys
    are its own ``key[i]``, the labelled ``queue [Qn, D]`` and the labelled ``targets [T, D]`` (the class
    targets, assigned to classes by the user: ``target_labels [T]``, a class's targets are its positives);
    ``l_ij = q_i . k_j / temperature``, ``log p_ij = l_ij - log sum_j exp(l_ij)`` over those keys only.
    ``L_i = -(1/Z_i) [log p_i,own + sum_{queue, y = y_i} log p_ij + tw sum_{targets, y = y_i} log p_ij]
    - log p_i,own`` with ``Z_i`` the number of positives (own key, queue and targets of the class, each
    counted once) and ``tw = target_weight``. ``normalize=True`` (the authors') L2-normalises the query, key and
    queue rows, never the targets. The queue and targets get no gradient (the authors' buffers).
    One fused pass gives the per-row log-denominator; the positive terms are linear in q_i (class sums of
    the queue and targets), O((B + Qn + T) D): ``L_i = A_i log sum_j exp(l_ij) - B_i`` with
    ``A_i = 1 + (1 + n_queue + tw n_targets) / Z_i`` (a per-row factor carried by the row weights).
    ``process_group``: the mean over the global batch (no anchor sees another sample's key, so each rank's
    rows need only its own pairs; the queue and targets are the same on every rank); ``distributed``
    "gather" (default) or "ring" as for the other losses (ring mode sends the keys around although only the
    own key scores: the same loss and gradients, with nothing of the other ranks' keys held at once).
    """
    _pair("query", query, "key", key)
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("normalize", normalize, (False, True))
    tw = _number("target_weight", target_weight, 0.0)
    bsz, device = query.shape[0], query.device
    labels = _check_labels(labels, bsz, device)
    queue, queue_labels = _labelled_keys("queue", queue, queue_labels, query)
    targets, target_labels = _labelled_keys("targets", targets, target_labels, query)
    weight = _check_weight(weight, [(bsz,)], device, "one per sample")
    acc = _accum_dtype(query)
    temperature, tau_float = _tau(temperature, acc)
    bank = queue if queue is None or not normalize else normalize_rows(queue, acc)
    n_queue = 0 if bank is None else bank.shape[0]

    def class_counts(y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Dense class ids of (y, queue labels, target labels) compared by value, and per anchor the number
        of queue rows and targets of its class."""
        all_labels = [y] + [x for x in (queue_labels, target_labels) if x is not None]
        common = functools.reduce(torch.promote_types, [x.dtype for x in all_labels])
        ids, classes = dense_ids(torch.cat([x.to(common) for x in all_labels]))
        anchor_ids, rest = ids[: y.shape[0]], ids[y.shape[0]:]

        def count(row_ids):
            ones = torch.ones(row_ids.shape[0], dtype=acc, device=y.device)
            return torch.zeros(classes, dtype=acc, device=y.device).index_add_(0, row_ids, ones)[anchor_ids]

        return anchor_ids, rest, count(rest[:n_queue]), count(rest[n_queue:]), classes

    def log_den_scale(y: Tensor) -> Tensor:
        """A_i = 1 + (1 + n_queue + tw n_targets) / Z_i: the weight of log sum_j exp(l_ij) in L_i."""
        _, _, queue_count, target_count, _ = class_counts(y)
        return 1 + (1 + queue_count + tw * target_count) / (1 + queue_count + target_count)

    def pair_rows(q, k, _=None):
        """(query, key) rows as the fused loss sees them (normalised with ``normalize``)."""
        return (_unit_rows(q, acc), _unit_rows(k, acc)) if normalize else (q, k)

    def build(q, k, y, _=None):
        q, k = pair_rows(q, k)
        more = [x.to(q.dtype) for x in (bank, targets) if x is not None]
        spec = _info_nce_spec(q, k, temperature, torch.cat(more) if more else None, False, tau_float=tau_float)
        # No positive term: the fused rows are the log-denominators (A_i rides in the row weights).
        return dataclasses.replace(spec, pos_row_weight=torch.zeros(q.shape[0], dtype=spec.accum_dtype,
                                                                     device=q.device))

    def positive_dots(q, k, y):
        """Per sample, [bsz, 3]: q_i . k_i and q_i dotted with the sums of the (detached) queue rows and targets
        of its class, from this process's (or rank's) rows: O((B + Qn + T) D)."""
        qa, ka = (x.to(acc) for x in pair_rows(q, k))
        anchor_ids, rest, _, _, classes = class_counts(y)

        def class_dot(keys: Optional[Tensor], row_ids: Tensor) -> Tensor:
            if keys is None:
                return torch.zeros(qa.shape[0], dtype=acc, device=qa.device)
            keys = keys.detach().to(acc)
            sums = torch.zeros(classes, keys.shape[1], dtype=acc, device=qa.device).index_add_(0, row_ids, keys)
            return (qa * sums[anchor_ids]).sum(1)

        return torch.stack([(qa * ka).sum(1), class_dot(bank, rest[:n_queue]), class_dot(targets, rest[n_queue:])],
                           dim=1)

    def positives(specs, q, k, y, dots):
        """-B_i / A_i per row: B_i = (l_own + sum_queue l + tw sum_targets l) / Z_i + l_own, from the dots."""
        spec = specs[0]
        spec_acc = spec.accum_dtype
        tau = spec.temperature.to(spec_acc) if isinstance(spec.temperature, Tensor) else spec.temperature
        _, _, queue_count, target_count, _ = class_counts(y)
        own, queue_dot, target_dot = (dots.to(spec_acc) / tau).unbind(1)
        b = (own + queue_dot + tw * target_dot) / (1 + queue_count + target_count) + own
        return -b / log_den_scale(y)

    scale = log_den_scale(labels)
    row_weight = scale if weight is None else scale * weight.to(scale.dtype)
    result = _blocks_loss([build], (query, key, labels), 1, backend=backend, process_group=process_group,
                          adjust=positives, reduction="sum" if reduction == "mean" else reduction, weight=row_weight,
                          distributed=distributed, sample_stat=positive_dots, places=[pair_rows])
    if reduction != "mean":
        return result
    total = (torch.full((), float(bsz), dtype=result.dtype, device=device) if weight is None
             else weight.to(result.dtype).sum())
    if process_group is not None:  # the global sum of the weights (they get no gradient in gather mode)
        total = total.detach()
        torch.distributed.all_reduce(total, group=process_group)
    return result / torch.where(total > 0, total, torch.ones_like(total))


# ----------------------------------------------------------------------------- modules

_FEATURES = "torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1).requires_grad_()"
_LABELS = "torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])"


def _example(*lines: str) -> str:
    return "\n    Example:\n" + "".join(f"        >>> {line}\n" for line in
                                        ("import torch, fused_contrastive as fc",) + lines)


class EpsSupInfoNCELoss(_LossModule):
    __doc__ = """Module form of ``eps_supinfonce_loss`` (epsilon-SupInfoNCE, Barbano et al.).

    ``L_i = -(c/|P_i|) sum_p [l_ip - log(exp(l_ip - epsilon) + sum_n exp(l_in))]`` over the positives p and
    negatives n of anchor i, ``l_ij = z_i . z_j / temperature``, ``c = temperature / base_temperature``.
    ``forward(features [bsz, n_views, D], labels [bsz] = None, *, extra_keys [E, D], extra_key_labels [E])``
    returns the mean over anchors (a scalar); every argument as in ``eps_supinfonce_loss``.
    """ + _example("criterion = fc.EpsSupInfoNCELoss(epsilon=0.1, temperature=0.1)",
                   f"loss = criterion({_FEATURES}, {_LABELS})")

    fn = staticmethod(eps_supinfonce_loss)

    def __init__(self, *, epsilon=0.1, temperature=0.1, base_temperature=None, contrast_mode="all", backend="auto",
                 process_group=None, distributed="gather", normalize=False, reduction="mean", form="out"):
        _number("epsilon", epsilon, 0.0)
        _check_base_temperature(base_temperature)
        _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
        _check_choice("form", form, ("out", "in"))
        super().__init__(epsilon=epsilon, temperature=temperature, base_temperature=base_temperature,
                         contrast_mode=contrast_mode, backend=backend, process_group=process_group,
                         distributed=distributed, normalize=normalize, reduction=reduction, form=form)

    def forward(self, features: Tensor, labels: Optional[Tensor] = None, *, extra_keys: Optional[Tensor] = None,
                extra_key_labels: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> Tensor:
        return eps_supinfonce_loss(features, labels, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                                   weight=weight, **self.kwargs)


class DCLLoss(_LossModule):
    __doc__ = """Module form of ``dcl_loss`` (decoupled contrastive loss, Yeh et al.; ``weighted=True``: DCLW).

    ``L_i = -w_i mean_p l_ip + log sum_n exp(l_in)``: the positives p (the other views) out of the denominator,
    ``l_ij = z_i . z_j / temperature``, ``w_i = 1`` (DCL) or the von Mises-Fisher weight (DCLW, 2 views;
    ``detach_weight=False``: the authors' form, trained through). ``forward(features [bsz, n_views, D], *,
    extra_keys [E, D] = None)`` returns the mean over the n_views·bsz anchors.
    """ + _example("criterion = fc.DCLLoss(temperature=0.1, weighted=True)", f"loss = criterion({_FEATURES})")

    fn = staticmethod(dcl_loss)

    def __init__(self, *, temperature=0.1, weighted=False, sigma=0.5, detach_weight=True, normalize=False,
                 backend="auto", process_group=None, distributed="gather", reduction="mean"):
        _check_choice("weighted", weighted, (False, True))
        _check_sigma(sigma)
        _check_choice("detach_weight", detach_weight, (False, True))
        super().__init__(temperature=temperature, weighted=weighted, sigma=sigma, detach_weight=detach_weight,
                         normalize=normalize, backend=backend, process_group=process_group, distributed=distributed,
                         reduction=reduction)

    def forward(self, features: Tensor, *, extra_keys: Optional[Tensor] = None,
                weight: Optional[Tensor] = None) -> Tensor:
        return dcl_loss(features, extra_keys=extra_keys, weight=weight, **self.kwargs)


class InfoNCELoss(_LossModule):
    __doc__ = """Module form of ``info_nce`` (InfoNCE / MoCo / one-way CLIP).

    ``L_i = -l_ii + log sum_j exp(l_ij)`` with ``l_ij = q_i . k_j / temperature`` over the keys and the
    ``queue`` rows (only the positive and the queue when ``in_batch_negatives=False``).
    ``forward(query [B, D], key [B, D], *, queue [Qn, D] = None)`` returns the mean over rows.
    """ + _example("criterion = fc.InfoNCELoss(temperature=0.2)",
                   "query, key = torch.nn.functional.normalize(torch.randn(2, 8, 16), dim=-1)",
                   "loss = criterion(query, key, queue=torch.nn.functional.normalize(torch.randn(32, 16), dim=-1))")

    fn = staticmethod(info_nce)

    def __init__(self, *, temperature=0.1, in_batch_negatives=True, symmetric=False, backend="auto",
                 process_group=None, distributed="gather", normalize=False, reduction="mean"):
        _check_choice("in_batch_negatives", in_batch_negatives, (False, True))
        _check_choice("symmetric", symmetric, (False, True))
        super().__init__(temperature=temperature, in_batch_negatives=in_batch_negatives, symmetric=symmetric,
                         backend=backend, process_group=process_group, distributed=distributed, normalize=normalize,
                         reduction=reduction)

    def forward(self, query: Tensor, key: Tensor, *, queue: Optional[Tensor] = None,
                weight: Optional[Tensor] = None) -> Tensor:
        return info_nce(query, key, queue=queue, weight=weight, **self.kwargs)


class ClipLoss(_LossModule):
    __doc__ = """Module form of ``clip_loss`` (CLIP's symmetric loss, open_clip's ``ClipLoss`` semantics).

    ``logits = logit_scale * image @ text.T``; the loss is the mean of the image->text and text->image
    cross-entropies with the diagonal as target. ``forward(image_features [B, D], text_features [B, D],
    logit_scale=None, *, logit_bias=None)`` as open_clip calls it. ``logit_scale`` (the exponentiated
    multiplier) and ``logit_bias`` are given either per call or once at construction (then registered: an
    ``nn.Parameter`` is learned with the loss), not both; ``clip_loss`` requires ``logit_scale``.
    """ + _example("criterion = fc.ClipLoss(logit_scale=torch.nn.Parameter(torch.tensor(14.3)))",
                   "image, text = torch.nn.functional.normalize(torch.randn(2, 8, 16), dim=-1)",
                   "criterion(image, text).backward()  # logit_scale gets its gradient")

    fn = staticmethod(clip_loss)

    def __init__(self, *, logit_scale=None, logit_bias=None, backend="auto", process_group=None, distributed="gather",
                 normalize=False,
                 reduction="mean"):
        if logit_scale is not None:
            _check_logit_scale(logit_scale)
        _check_logit_bias(logit_bias)
        super().__init__(logit_scale=logit_scale, logit_bias=logit_bias, backend=backend,
                         process_group=process_group, distributed=distributed, normalize=normalize, reduction=reduction)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale=None, *, logit_bias=None,
                weight: Optional[Tensor] = None) -> Tensor:
        kwargs = self.kwargs
        logit_scale = _one_of("logit_scale", kwargs.pop("logit_scale"), logit_scale)
        if logit_scale is None:
            raise ValueError("logit_scale must be given, to ClipLoss(logit_scale=...) or to forward")
        kwargs["logit_bias"] = _one_of("logit_bias", kwargs["logit_bias"], logit_bias)
        return clip_loss(image_features, text_features, logit_scale, weight=weight, **kwargs)


class DebiasedContrastiveLoss(_LossModule):
    __doc__ = """Module form of ``debiased_contrastive_loss`` (Chuang et al.; hard negatives, Robinson et al.,
    if beta > 0).

    ``L_i = -log(e^{l_ip} / (e^{l_ip} + Ng))`` with the debiased (and, for ``beta > 0``, reweighted)
    negative mass ``Ng`` estimated from the n negatives and clamped below at ``n e^{-1/temperature}``.
    ``forward(features [bsz, n_views, D], *, extra_keys [E, D] = None)`` returns the mean over the anchors
    (with more than 2 views, over the (anchor, positive view) pairs).
    """ + _example("criterion = fc.DebiasedContrastiveLoss(tau_plus=0.1, beta=0.5)", f"loss = criterion({_FEATURES})")

    fn = staticmethod(debiased_contrastive_loss)

    def __init__(self, *, temperature=0.5, tau_plus=0.1, beta=0.0, normalize=False, backend="auto",
                 process_group=None, distributed="gather", reduction="mean"):
        _number("tau_plus", tau_plus, 0.0, 1.0, closed_high=False)
        _number("beta", beta, 0.0)
        super().__init__(temperature=temperature, tau_plus=tau_plus, beta=beta, normalize=normalize, backend=backend,
                         process_group=process_group, distributed=distributed, reduction=reduction)

    def forward(self, features: Tensor, *, extra_keys: Optional[Tensor] = None,
                weight: Optional[Tensor] = None) -> Tensor:
        return debiased_contrastive_loss(features, extra_keys=extra_keys, weight=weight, **self.kwargs)


class BCLLoss(_LossModule):
    __doc__ = """Module form of ``bcl_loss`` (balanced contrastive loss, Zhu et al.).

    SupCon (L_out) whose denominator weighs key j by ``1 / (cnt[y_j] - [y_j == y_i])``, its class's batch
    count. ``forward(features [bsz, n_views, D], labels [bsz], *, class_centers [C, D] = None, extra_keys,
    extra_key_labels)``. ``class_centers`` are given either per call or once at construction (then
    registered: an ``nn.Parameter`` is learned with the loss, a tensor is a buffer), not both.
    """ + _example("criterion = fc.BCLLoss(temperature=0.1, class_centers=torch.nn.Parameter(torch.randn(3, 16)))",
                   f"loss = criterion({_FEATURES}, {_LABELS})")

    fn = staticmethod(bcl_loss)

    def __init__(self, *, temperature=0.1, class_centers=None, backend="auto", process_group=None,
                 distributed="gather", normalize=False,
                 reduction="mean"):
        if class_centers is not None and (not isinstance(class_centers, Tensor) or class_centers.dim() != 2
                                          or not class_centers.is_floating_point()):
            shape = tuple(class_centers.shape) if isinstance(class_centers, Tensor) else type(class_centers).__name__
            raise ValueError(f"class_centers must be a floating tensor of shape [C, D], got {shape}")
        super().__init__(temperature=temperature, class_centers=class_centers, backend=backend,
                         process_group=process_group, distributed=distributed, normalize=normalize, reduction=reduction)

    def forward(self, features: Tensor, labels: Tensor, *, class_centers: Optional[Tensor] = None,
                extra_keys: Optional[Tensor] = None, extra_key_labels: Optional[Tensor] = None,
                weight: Optional[Tensor] = None) -> Tensor:
        kwargs = self.kwargs
        kwargs["class_centers"] = _one_of("class_centers", kwargs["class_centers"], class_centers)
        return bcl_loss(features, labels, extra_keys=extra_keys, extra_key_labels=extra_key_labels, weight=weight,
                        **kwargs)


class SpreadLoss(_LossModule):
    __doc__ = """Module form of ``spread_loss`` (class-conditional InfoNCE, Chen et al. 2022, the authors' definition).

    For each pair of views u > v: ``L_i = -l_ii + log sum_{j: y_j = y_i} exp(l_ij)``, ``l_ij = z_{u,i} . z_{v,j} /
    temperature``: view u's row of sample i as anchor, view v's rows of its class as denominator (its own
    sample's row, the positive, included). ``forward(features [bsz, n_views, D], labels [bsz], *, extra_keys,
    extra_key_labels)`` returns the mean over anchors and pairs of views (a scalar).
    """ + _example("criterion = fc.SpreadLoss(temperature=0.5)", f"loss = criterion({_FEATURES}, {_LABELS})")

    fn = staticmethod(spread_loss)

    def __init__(self, *, temperature=0.5, normalize=False, backend="auto", process_group=None, distributed="gather",
                 reduction="mean"):
        super().__init__(temperature=temperature, normalize=normalize, backend=backend, process_group=process_group,
                         distributed=distributed, reduction=reduction)

    def forward(self, features: Tensor, labels: Tensor, *, extra_keys: Optional[Tensor] = None,
                extra_key_labels: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> Tensor:
        return spread_loss(features, labels, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                           weight=weight, **self.kwargs)


class SymmetricSpreadLoss(_LossModule):
    __doc__ = """Module form of ``symmetric_spread_loss`` (class-conditional NT-Xent: every view an anchor).

    ``L_i = -mean_p l_ip + log sum_{j != i: y_j = y_i} exp(l_ij)``: the other views of the sample as positives,
    every other view of the anchor's class as denominator. ``forward(features [bsz, n_views, D], labels [bsz],
    *, extra_keys, extra_key_labels)`` returns the mean over the n_views·bsz anchors.
    """ + _example("criterion = fc.SymmetricSpreadLoss(temperature=0.5)", f"loss = criterion({_FEATURES}, {_LABELS})")

    fn = staticmethod(symmetric_spread_loss)

    def __init__(self, *, temperature=0.5, normalize=False, backend="auto", process_group=None, distributed="gather",
                 reduction="mean"):
        super().__init__(temperature=temperature, normalize=normalize, backend=backend, process_group=process_group,
                         distributed=distributed, reduction=reduction)

    def forward(self, features: Tensor, labels: Tensor, *, extra_keys: Optional[Tensor] = None,
                extra_key_labels: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> Tensor:
        return symmetric_spread_loss(features, labels, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                                     weight=weight, **self.kwargs)


_UNIVERSUM = "torch.nn.functional.normalize(torch.randn(16, 16), dim=-1)"


class UniConLoss(_LossModule):
    __doc__ = """Module form of ``unicon_loss`` (UniCon, Han et al.: mixup universum rows as the keys).

    ``L_i = -(c/|P_i|) sum_{p in P_i} [l_ip - log sum_{j != i} exp(l_ij)]``, ``l_ij = z_i . u_j / temperature``
    over the universum rows u_j (labelled by the sample each was mixed from), P_i those of the anchor's class,
    c = temperature / base_temperature. ``forward(features [bsz, n_views, D], universum [n_views·bsz, D] (view-major)
    or [bsz, n_views, D], labels [bsz])`` (the authors' argument order) returns the mean over anchors.
    """ + _example("criterion = fc.UniConLoss(temperature=0.1)",
                   f"loss = criterion({_FEATURES}, {_UNIVERSUM}, {_LABELS})")

    fn = staticmethod(unicon_loss)

    def __init__(self, *, temperature=0.1, base_temperature=None, contrast_mode="all", normalize=False,
                 backend="auto", process_group=None, distributed="gather", reduction="mean"):
        _check_base_temperature(base_temperature)
        _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
        super().__init__(temperature=temperature, base_temperature=base_temperature, contrast_mode=contrast_mode,
                         normalize=normalize, backend=backend, process_group=process_group, distributed=distributed,
                         reduction=reduction)

    def forward(self, features: Tensor, universum: Tensor, labels: Tensor, *,
                weight: Optional[Tensor] = None) -> Tensor:
        return unicon_loss(features, universum, labels, weight=weight, **self.kwargs)


class SuNCEtLoss(_LossModule):
    __doc__ = """Module form of ``suncet_loss`` (SuNCEt, Assran et al.).

    ``L_i = log sum_{j != i} exp(l_ij) - log sum_{p in P_i} exp(l_ip)``: minus the log of the summed softmax
    probability of the keys of the anchor's class (SupCon's L_in without its log |P_i|). ``forward(features
    [bsz, n_views, D], labels [bsz], *, support [S, D] = None, support_labels [S] = None)`` returns the mean
    over anchors; the support rows are labelled keys, never anchors.
    """ + _example("criterion = fc.SuNCEtLoss(temperature=0.1, normalize=True)",
                   f"loss = criterion({_FEATURES}, {_LABELS})")

    fn = staticmethod(suncet_loss)

    def __init__(self, *, temperature=0.1, contrast_mode="all", normalize=False, backend="auto", process_group=None,
                 distributed="gather",
                 reduction="mean"):
        _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
        super().__init__(temperature=temperature, contrast_mode=contrast_mode, normalize=normalize, backend=backend,
                         process_group=process_group, distributed=distributed, reduction=reduction)

    def forward(self, features: Tensor, labels: Tensor, *, support: Optional[Tensor] = None,
                support_labels: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> Tensor:
        return suncet_loss(features, labels, support=support, support_labels=support_labels, weight=weight,
                           **self.kwargs)



class PaCoLoss(_LossModule):
    __doc__ = """Module form of ``paco_loss`` (PaCo / GPaCo, Cui et al.): SupCon with one learnable center per class.

    ``L_i = -c / W_i [sum_k m_ik log p_ik + alpha sum_{j: y_j = y_i} log p_ij]`` over the centers k (logits
    ``(q_i . c_k + o_k) / supervised_temperature``) and the view / queue keys j (logits ``q_i . k_j /
    temperature``, weighted gamma in the denominator). ``class_centers [C, D]`` is given to the constructor
    (an ``nn.Parameter`` is registered and trained) or per call; ``forward(features [bsz, n_views, D], labels
    [bsz], *, class_centers=None, extra_keys=None, extra_key_labels=None, weight=None)``.
    """ + _example("criterion = fc.PaCoLoss(torch.nn.Parameter(torch.randn(3, 16)), alpha=0.05, "
                   "supervised_temperature=1.0)", f"loss = criterion({_FEATURES}, {_LABELS})")

    fn = staticmethod(paco_loss)

    def __init__(self, class_centers=None, *, alpha=1.0, beta=1.0, gamma=1.0, temperature=0.2,
                 supervised_temperature=None, base_temperature=None, label_smoothing=0.0, logit_offsets=None,
                 contrast_mode="one", normalize=False, backend="auto", process_group=None, distributed="gather",
                 reduction="mean"):
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            _number(name, value, 0.0)
        _number("label_smoothing", label_smoothing, 0.0, 1.0)
        if supervised_temperature is not None:
            _number("supervised_temperature", supervised_temperature, 0.0)
        _check_base_temperature(base_temperature)
        _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
        super().__init__(class_centers=class_centers, alpha=alpha, beta=beta, gamma=gamma, temperature=temperature,
                         supervised_temperature=supervised_temperature, base_temperature=base_temperature,
                         label_smoothing=label_smoothing, logit_offsets=logit_offsets, contrast_mode=contrast_mode,
                         normalize=normalize, backend=backend, process_group=process_group, distributed=distributed,
                         reduction=reduction)

    def forward(self, features: Tensor, labels: Tensor, *, class_centers: Optional[Tensor] = None,
                extra_keys: Optional[Tensor] = None, extra_key_labels: Optional[Tensor] = None,
                weight: Optional[Tensor] = None) -> Tensor:
        kwargs = self.kwargs
        centers = kwargs.pop("class_centers") if class_centers is None else class_centers
        if centers is None:
            raise ValueError("class_centers must be given to the constructor or to forward")
        return paco_loss(features, labels, centers, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                         weight=weight, **{k: v for k, v in kwargs.items() if k != "class_centers"})


class TSCLoss(_LossModule):
    __doc__ = """Module form of ``tsc_loss`` (targeted supervised contrastive learning, Li et al.).

    ``L_i = -(1/Z_i) [log p_i,own + sum_{queue, y = y_i} log p_ij + tw sum_{targets, y = y_i} log p_ij]
    - log p_i,own`` over the keys own key, queue and targets. ``forward(query [B, D], key [B, D], labels [B], *,
    queue=None, queue_labels=None, targets=None, target_labels=None, weight=None)``; the target assignment
    (which class owns which target) stays the caller's.
    """ + _example("criterion = fc.TSCLoss(temperature=0.07, target_weight=0.5)",
                   "query, key = torch.randn(2, 8, 16)",
                   f"loss = criterion(query, key, {_LABELS}, targets=torch.randn(3, 16), "
                   "target_labels=torch.arange(3))")

    fn = staticmethod(tsc_loss)

    def __init__(self, *, target_weight=1.0, temperature=0.07, normalize=True, backend="auto", process_group=None,
                 distributed="gather", reduction="mean"):
        _number("target_weight", target_weight, 0.0)
        super().__init__(target_weight=target_weight, temperature=temperature, normalize=normalize,
                         backend=backend, process_group=process_group, distributed=distributed, reduction=reduction)

    def forward(self, query: Tensor, key: Tensor, labels: Tensor, *, queue: Optional[Tensor] = None,
                queue_labels: Optional[Tensor] = None, targets: Optional[Tensor] = None,
                target_labels: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> Tensor:
        return tsc_loss(query, key, labels, queue=queue, queue_labels=queue_labels, targets=targets,
                        target_labels=target_labels, weight=weight, **self.kwargs)



class EpsilonSupConLoss(_LossModule):
    __doc__ = """Module form of ``epsilon_supcon_loss`` (EpsilonSupCon, Barbano et al., Eq. 18).

    ``L_i = -(c/|P_i|) sum_p [l_ip - log(sum_{p'} exp(l_ip' - epsilon) + sum_n exp(l_in))]``.
    ``forward(features [bsz, n_views, D], labels [bsz] = None, *, extra_keys=None, extra_key_labels=None,
    weight=None)``.
    """ + _example("criterion = fc.EpsilonSupConLoss(epsilon=0.25, temperature=0.1)",
                   f"loss = criterion({_FEATURES}, {_LABELS})")

    fn = staticmethod(epsilon_supcon_loss)

    def __init__(self, *, epsilon=0.1, temperature=0.1, base_temperature=None, contrast_mode="all", normalize=False,
                 backend="auto", process_group=None, distributed="gather", reduction="mean"):
        _number("epsilon", epsilon, 0.0)
        _check_base_temperature(base_temperature)
        _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
        super().__init__(epsilon=epsilon, temperature=temperature, base_temperature=base_temperature,
                         contrast_mode=contrast_mode, normalize=normalize, backend=backend,
                         process_group=process_group, distributed=distributed, reduction=reduction)

    def forward(self, features: Tensor, labels: Optional[Tensor] = None, *, extra_keys: Optional[Tensor] = None,
                extra_key_labels: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> Tensor:
        return epsilon_supcon_loss(features, labels, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                                   weight=weight, **self.kwargs)


_QUERY_KEY = "query, key = torch.nn.functional.normalize(torch.randn(2, 8, 16), dim=-1)"
_FUNCTION_EXAMPLES = {
    eps_supinfonce_loss: _example(f"loss = fc.eps_supinfonce_loss({_FEATURES}, {_LABELS}, epsilon=0.1)"),
    dcl_loss: _example(f"loss = fc.dcl_loss({_FEATURES}, temperature=0.1, weighted=True)"),
    info_nce: _example(_QUERY_KEY, "loss = fc.info_nce(query, key, temperature=0.2, symmetric=True)"),
    clip_loss: _example("image, text = torch.nn.functional.normalize(torch.randn(2, 8, 16), dim=-1)",
                        "loss = fc.clip_loss(image, text, logit_scale=torch.tensor(14.3))"),
    debiased_contrastive_loss: _example(f"loss = fc.debiased_contrastive_loss({_FEATURES}, tau_plus=0.1, beta=0.5)"),
    bcl_loss: _example(f"loss = fc.bcl_loss({_FEATURES}, {_LABELS}, class_centers=torch.randn(3, 16))"),
    spread_loss: _example(f"loss = fc.spread_loss({_FEATURES}, {_LABELS})"),
    symmetric_spread_loss: _example(f"loss = fc.symmetric_spread_loss({_FEATURES}, {_LABELS})"),
    unicon_loss: _example(f"loss = fc.unicon_loss({_FEATURES}, {_UNIVERSUM}, {_LABELS})"),
    suncet_loss: _example(f"loss = fc.suncet_loss({_FEATURES}, {_LABELS}, normalize=True)"),
    epsilon_supcon_loss: _example(f"loss = fc.epsilon_supcon_loss({_FEATURES}, {_LABELS}, epsilon=0.25)"),
    paco_loss: _example(f"loss = fc.paco_loss({_FEATURES}, {_LABELS}, torch.randn(3, 16), alpha=0.05, beta=1.0, "
                        "gamma=1.0, supervised_temperature=1.0, label_smoothing=0.1)"),
}
_PAIR_LOSSES = (info_nce, clip_loss)
for _fn, _doc in _FUNCTION_EXAMPLES.items():
    _fn.__doc__ += (PAIRS_REDUCTION_DOC if _fn in _PAIR_LOSSES else VIEWS_REDUCTION_DOC) + _GROUP_DOC + "\n" + _doc
_MODULE_DOC = """
    ``reduction`` (constructor) and ``weight`` (forward) as in the function: "mean" (default), "sum" or "none"
    (the per-anchor losses), with optional per-sample weights >= 0.
"""
for _cls in (EpsSupInfoNCELoss, DCLLoss, InfoNCELoss, ClipLoss, DebiasedContrastiveLoss, BCLLoss, SpreadLoss,
             SymmetricSpreadLoss, UniConLoss, SuNCEtLoss, PaCoLoss):
    _cls.__doc__ = _cls.__doc__.replace("\n    Example:", _MODULE_DOC + "\n    Example:", 1)
