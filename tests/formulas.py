"""Independent float64 re-derivations of the contrastive-loss family, written from the formulas.

Each function is deliberately plain: dense N x N logits, an explicit Python loop over anchors,
log-sum-exp for every denominator. None of them imports ``fused_contrastive``; they are the
oracle that the package's backends are compared with in ``test_family.py``.

Conventions shared by all of them:

* ``features`` of shape ``[B, V, D]`` is stacked view-major, ``Z = cat(unbind(features, 1))``,
  so row ``v * B + b`` is view ``v`` of sample ``b``.
* ``l_ij = z_i . z_j / temperature``; "self" (``j == i``) is excluded from every set.
* The result is a 0-dim float64 tensor, differentiable w.r.t. every tensor input
  (features, logit_scale, class_centers, extra_keys, ...), and finite on degenerate rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


def _stack_views(features: Tensor) -> Tensor:
    """[B, V, D] -> [V * B, D], view-major."""
    assert features.dim() == 3, f"features must be [B, V, D], got {tuple(features.shape)}"
    return torch.cat(torch.unbind(features.to(torch.float64), dim=1), dim=0)


def _lse(x: Tensor) -> Tensor:
    """log-sum-exp of a 1-D tensor; -inf for an empty one (an empty sum is 0)."""
    if x.numel() == 0:
        return torch.tensor(NEG_INF, dtype=torch.float64)
    return torch.logsumexp(x, dim=0)


def _row_labels(labels, bsz: int, n_views: int) -> Tensor:
    """Labels of the V*B stacked rows; sample ids when labels is None."""
    if labels is None:
        labels = torch.arange(bsz)
    labels = torch.as_tensor(labels).reshape(-1)
    assert labels.numel() == bsz
    return labels.repeat(n_views)


def _with_extra(z: Tensor, y: Tensor, extra_keys, extra_key_labels) -> tuple[Tensor, Tensor]:
    """Keys and key labels: the view rows, then the extra keys (a memory bank), which are never anchors.
    Extra keys without labels get the label -1, which no row has (``y`` holds sample ids or labels >= 0)."""
    if extra_keys is None:
        return z, y
    extra_y = (torch.full((extra_keys.shape[0],), -1) if extra_key_labels is None
               else torch.as_tensor(extra_key_labels).reshape(-1).to(y.dtype))
    return torch.cat([z, extra_keys.to(torch.float64)]), torch.cat([y, extra_y])


def _mean(per_anchor: list) -> Tensor:
    return torch.stack(per_anchor).mean()


def _zero(row: Tensor) -> Tensor:
    """An exact 0 that stays attached to the graph (zero gradient), so the loss is always
    differentiable, also when every anchor is degenerate."""
    return row.sum() * 0.0


# ------------------------------------------------------------------------------------------
# epsilon-SupInfoNCE (Barbano et al., "Unbiased Supervised Contrastive Learning")
# ------------------------------------------------------------------------------------------
def eps_supinfonce(features, labels=None, *, epsilon=0.1, temperature=0.1, base_temperature=None,
                   contrast_mode="all", extra_keys=None, extra_key_labels=None):
    """L_i = -(c/|P_i|) sum_{p in P_i} [ l_ip - log( exp(l_ip - eps) + sum_{n in N_i} exp(l_in) ) ].

    P_i: keys with the anchor's label, self excluded (labels None: the other views of the sample).
    N_i: keys with a different label. c = temperature / base_temperature (1 if base is None).
    contrast_mode "one": anchors are the B rows of view 0; keys are always all B*V rows.
    L_i = 0 when P_i is empty (the anchor still counts in the mean). An empty N_i contributes an
    empty sum (0): the log term is then just l_ip - eps. All in log-sum-exp form, so temperatures
    down to 0.01 do not overflow.
    """
    return _eps_rows(features, labels, epsilon, temperature, base_temperature, contrast_mode, extra_keys,
                     extra_key_labels, form="out")


# ------------------------------------------------------------------------------------------
# Decoupled contrastive learning (Yeh et al.), with the optional von Mises-Fisher weighting
# ------------------------------------------------------------------------------------------
def dcl(features, *, temperature=0.1, weighted=False, sigma=0.5, detach_weight=True, normalize=False, extra_keys=None):
    """L_i = -w_i * mean_p l_ip + log sum_{n} exp(l_in): p over the other views of the anchor's sample, n over
    the views of the other samples (and the extra keys). features [B, V, D], B >= 2, V >= 2.

    w_i = 1, or for DCLW (V = 2) w = 2 - B * softmax_b(s_b / sigma), the same for both views of sample b:
    detach_weight=True: s_b = cos(z1_b, z2_b) of the views as given, w a constant;
    detach_weight=False (the authors' reference code): s_b = z1_b . z2_b and w differentiated through.
    normalize: every row (views and extra keys) L2-normalised first. Mean over the B*V anchors.
    """
    bsz, n_views = features.shape[:2]
    assert n_views >= 2 and bsz >= 2
    f = features.to(torch.float64)
    extra = None if extra_keys is None else extra_keys.to(torch.float64)
    if normalize:
        f = torch.nn.functional.normalize(f, dim=-1)
        extra = None if extra is None else torch.nn.functional.normalize(extra, dim=-1)
    z = _stack_views(f)
    keys = z if extra is None else torch.cat([z, extra])
    logits = z @ keys.T / temperature
    if weighted:
        assert n_views == 2
        if detach_weight:
            s = torch.nn.functional.cosine_similarity(f[:, 0].detach(), f[:, 1].detach(), dim=-1)
        else:
            s = (f[:, 0] * f[:, 1]).sum(-1)
        w_sample = 2.0 - bsz * torch.softmax(s / sigma, dim=0)
    else:
        w_sample = torch.ones(bsz, dtype=torch.float64)
    sample = torch.cat([torch.arange(bsz).repeat(n_views), torch.full((keys.shape[0] - n_views * bsz,), -1)])
    losses = []
    for i in range(n_views * bsz):
        own = sample == i % bsz
        positives = own.clone()
        positives[i] = False
        losses.append(-w_sample[i % bsz] * logits[i][positives].mean() + _lse(logits[i][~own]))
    return _mean(losses)


# ------------------------------------------------------------------------------------------
# InfoNCE (query/key, optional MoCo queue)
# ------------------------------------------------------------------------------------------
def info_nce(query, key, *, temperature=0.1, queue=None, in_batch_negatives=True, symmetric=False):
    """L_i = -l_ii + log sum_{j in den_i} exp(l_ij), l_ij = q_i . k_j / t, queue rows q_i . u_m / t.

    den_i: all B keys + the queue (in_batch_negatives) or key[i] + the queue. Mean over B rows.
    symmetric (no queue only): 0.5 * (info_nce(q, k) + info_nce(k, q)). The queue is detached.
    """
    if symmetric:
        assert queue is None, "symmetric InfoNCE is defined without a queue"
        kw = dict(temperature=temperature, in_batch_negatives=in_batch_negatives)
        return 0.5 * (info_nce(query, key, **kw) + info_nce(key, query, **kw))
    q = query.to(torch.float64)
    k = key.to(torch.float64)
    bsz = q.shape[0]
    logits = q @ k.T / temperature  # [B, B]
    if queue is not None:
        queue_logits = q @ queue.detach().to(torch.float64).T / temperature  # [B, Qn]
    else:
        queue_logits = torch.zeros(bsz, 0, dtype=torch.float64)
    losses = []
    for i in range(bsz):
        batch = logits[i] if in_batch_negatives else logits[i, i:i + 1]
        losses.append(-logits[i, i] + _lse(torch.cat([batch, queue_logits[i]])))
    return _mean(losses)


# ------------------------------------------------------------------------------------------
# CLIP / ALIGN symmetric cross-entropy
# ------------------------------------------------------------------------------------------
def clip(image, text, logit_scale, *, logit_bias=None):
    """logits = logit_scale * image @ text.T (+ logit_bias);
    loss = 0.5 * (CE(logits, arange(B)) + CE(logits.T, arange(B))), CE written as -l_ii + LSE.
    logit_scale is the multiplier itself (already exponentiated): a float or a tensor."""
    img = image.to(torch.float64)
    txt = text.to(torch.float64)
    logits = logit_scale * (img @ txt.T)
    bias = 0.0 if logit_bias is None else logit_bias
    bsz = logits.shape[0]
    # LSE(l + b) = b + LSE(l): written so, the bias's gradient is -1 + 1 = 0 exactly in each term, where
    # autograd through logsumexp(l + b) leaves a rounding residue (~1e-16) that a relative comparison with
    # the exact 0 of the package cannot take.
    image_to_text = [-(logits[i, i] + bias) + (bias + _lse(logits[i, :])) for i in range(bsz)]
    text_to_image = [-(logits[i, i] + bias) + (bias + _lse(logits[:, i])) for i in range(bsz)]
    return 0.5 * (_mean(image_to_text) + _mean(text_to_image))


# ------------------------------------------------------------------------------------------
# Debiased (Chuang et al.) / hard-negative (Robinson et al.) contrastive loss
# ------------------------------------------------------------------------------------------
def debiased(features, *, temperature=0.5, tau_plus=0.1, beta=0.0, normalize=False, extra_keys=None):
    """Chuang et al.'s debiased loss with Robinson et al.'s hardness reweighting (beta > 0).

    For each anchor row i and each positive p (another view of i's sample; with V = 2 the one other view):
    pos = exp(l_ip); negatives: the Nn = V (B - 1) views of the other samples (+ extra keys).
    reweight_i = sum_n exp(l_in)                                   (beta == 0)
               = sum_n imp_in exp(l_in) / mean_n imp_in, imp = exp(beta * l_in)   (beta > 0)
    Ng = max((-tau_plus * Nn * pos + reweight_i) / (1 - tau_plus), Nn * exp(-1/t))
    L_ip = -log(pos / (pos + Ng)); mean over the (anchor, positive) pairs. B >= 2.

    Plain exponentials in float64, as the papers' code does: exact and finite for the temperatures
    tested (>= 0.1, normalised features: |l| <= 10); not meant for t ~ 0.01.
    """
    bsz, n_views = features.shape[:2]
    assert n_views >= 2 and bsz >= 2
    f = features.to(torch.float64)
    extra = None if extra_keys is None else extra_keys.to(torch.float64)
    if normalize:
        f = torch.nn.functional.normalize(f, dim=-1)
        extra = None if extra is None else torch.nn.functional.normalize(extra, dim=-1)
    z = _stack_views(f)
    keys = z if extra is None else torch.cat([z, extra])
    logits = z @ keys.T / temperature
    sample = torch.cat([torch.arange(bsz).repeat(n_views), torch.full((keys.shape[0] - n_views * bsz,), -1)])
    n_neg = keys.shape[0] - n_views
    floor = n_neg * torch.exp(torch.tensor(-1.0 / temperature, dtype=torch.float64))
    losses = []
    for i in range(n_views * bsz):
        l_neg = logits[i][sample != i % bsz]
        neg = torch.exp(l_neg)
        if beta == 0:
            reweight = neg.sum()
        else:
            imp = torch.exp(beta * l_neg)
            reweight = (imp * neg).sum() / imp.mean()
        for v in range(n_views):
            p = v * bsz + i % bsz
            if p == i:
                continue
            pos = torch.exp(logits[i, p])
            ng = torch.clamp((-tau_plus * n_neg * pos + reweight) / (1.0 - tau_plus), min=float(floor))
            losses.append(-torch.log(pos / (pos + ng)))
    return _mean(losses)


# ------------------------------------------------------------------------------------------
# Balanced contrastive learning (Zhu et al., BalSCL)
# ------------------------------------------------------------------------------------------
def bcl(features, labels, *, temperature=0.1, class_centers=None, extra_keys=None, extra_key_labels=None):
    """Class-averaged SupCon over the 2B views plus (optionally) C class centres as keys.

    Keys: the 2B view rows, then centre c (label c) for c < C. cnt[y]: keys with label y.
    Denominator weight count of key j for anchor i: cnt[y_j] - 1 if y_j == y_i else cnt[y_j].
    L_i = -(1/|P_i|) sum_{p in P_i} [ l_ip - log sum_{j != i} exp(l_ij) / count_ij ],
    P_i = same-label keys (centres included), self excluded; L_i = 0 if P_i is empty.
    Mean over the 2B anchors (centres are never anchors).
    """
    bsz, n_views = features.shape[:2]
    assert n_views == 2
    z = _stack_views(features)
    y = torch.as_tensor(labels).reshape(-1).repeat(2)
    if class_centers is not None:
        centers = class_centers.to(torch.float64)
        n_centers = centers.shape[0]
        assert bool(((y >= 0) & (y < n_centers)).all())
        keys = torch.cat([z, centers], dim=0)
        y_keys = torch.cat([y, torch.arange(n_centers, dtype=y.dtype)])
    else:
        keys, y_keys = z, y
    keys, y_keys = _with_extra(keys, y_keys, extra_keys, extra_key_labels)
    cnt = torch.tensor([int((y_keys == v).sum()) for v in y_keys], dtype=torch.float64)  # cnt[y_j]
    logits = z @ keys.T / temperature  # [2B, K]
    key_idx = torch.arange(keys.shape[0])
    losses = []
    for i in range(2 * bsz):
        not_self = key_idx != i
        same = y_keys == y[i]
        count = cnt - same.to(torch.float64)
        log_den = _lse((logits[i] - torch.log(count))[not_self])
        pos = same & not_self
        if not bool(pos.any()):
            losses.append(_zero(logits[i]))
            continue
        losses.append(-(logits[i][pos] - log_den).mean())
    return _mean(losses)


# ------------------------------------------------------------------------------------------
# Class-conditional InfoNCE ("spread", Chen et al. 2022): the authors' definition and the symmetric form
# ------------------------------------------------------------------------------------------
def _normalized(x, normalize):
    x = x.to(torch.float64)
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def spread(features, labels, *, temperature=0.5, normalize=False, extra_keys=None, extra_key_labels=None):
    """The authors' spread term: for every pair of views u > v, the anchors are view u's rows and the
    keys view v's rows (then the extra keys); anchor i's positive is key i, its denominator the keys with
    its label, key i included: L_i = -l_ii + log sum_{j: y_j = y_i} exp(l_ij). Mean over the B anchors of a
    pair, averaged over the V (V - 1) / 2 pairs. normalize: cosine logits (every row L2-normalised)."""
    bsz, n_views = features.shape[:2]
    assert n_views >= 2
    y = torch.as_tensor(labels).reshape(-1)
    pair_losses = []
    for u in range(n_views):
        for v in range(u):
            anchors = _normalized(features[:, u], normalize)
            keys = _normalized(features[:, v], normalize)
            key_y = y
            if extra_keys is not None:
                keys = torch.cat([keys, _normalized(extra_keys, normalize)])
                bank_y = torch.as_tensor(extra_key_labels).reshape(-1).to(torch.float64)
                key_y = torch.cat([y.to(torch.float64), bank_y])
            logits = anchors @ keys.T / temperature
            rows = [-logits[i, i] + _lse(logits[i][key_y == y[i]]) for i in range(bsz)]
            pair_losses.append(_mean(rows))
    return torch.stack(pair_losses).mean()


def symmetric_spread(features, labels, *, temperature=0.5, normalize=False, extra_keys=None, extra_key_labels=None):
    """Every view row an anchor: L_i = -mean_p l_ip + log sum_{j != i, y_j == y_i} exp(l_ij), p over the
    other views of the sample (always in the denominator). features [B, V, D]; mean over the V*B anchors."""
    bsz, n_views = features.shape[:2]
    assert n_views >= 2
    z = _stack_views(_normalized(features, normalize))
    y = torch.as_tensor(labels).reshape(-1).repeat(n_views)
    extra = None if extra_keys is None else _normalized(extra_keys, normalize)
    all_keys, y_keys = _with_extra(z, y, extra, extra_key_labels)
    logits = z @ all_keys.T / temperature
    keys = torch.arange(all_keys.shape[0])
    sample = torch.cat([torch.arange(bsz).repeat(n_views), torch.full((keys.numel() - n_views * bsz,), -1)])
    losses = []
    for i in range(n_views * bsz):
        positives = (sample == i % bsz) & (keys != i)
        den = (keys != i) & (y_keys == y[i])
        losses.append(-logits[i][positives].mean() + _lse(logits[i][den]))
    return _mean(losses)


# ------------------------------------------------------------------------------------------
# UniCon (Han et al.): the universum rows are the keys
# ------------------------------------------------------------------------------------------
def unicon(features, universum, labels, *, temperature=0.1, base_temperature=None, contrast_mode="all",
           normalize=False):
    """Keys: the universum rows u_j, j < V*B, stacked view-major like the views ([V*B, D]); u_j carries
    the label of sample j % B. Anchors: the V*B view rows ("all") or view 0's B rows ("one").
    P_i: universum rows with the anchor's label, j != i; denominator: every universum row but j = i.
    L_i = -(c/|P_i|) sum_{p in P_i} [l_ip - log sum_{j != i} exp(l_ij)], c = t / base_t (1 if None);
    0 when P_i is empty. Mean over anchors."""
    bsz, n_views = features.shape[:2]
    z = _stack_views(_normalized(features, normalize))
    u = _normalized(universum, normalize)
    y = torch.as_tensor(labels).reshape(-1).repeat(n_views)
    c = 1.0 if base_temperature is None else temperature / base_temperature
    n_anchors = bsz if contrast_mode == "one" else bsz * n_views
    logits = z[:n_anchors] @ u.T / temperature
    keys = torch.arange(u.shape[0])
    losses = []
    for i in range(n_anchors):
        kept = keys != i
        positives = kept & (y == y[i])
        if not bool(positives.any()):
            losses.append(_zero(logits[i]))
            continue
        losses.append(-c * (logits[i][positives] - _lse(logits[i][kept])).mean())
    return _mean(losses)


# ------------------------------------------------------------------------------------------
# SuNCEt (Assran et al.): minus the log of the class's summed softmax probability over the support
# ------------------------------------------------------------------------------------------
def suncet(features, labels, *, temperature=0.1, contrast_mode="all", normalize=False, support=None,
           support_labels=None):
    """Support: the V*B view rows, then the labelled support rows. p_ij = softmax over the support
    without the anchor itself; L_i = -log sum_{j: y_j = y_i} p_ij (0 when the anchor's class has no other
    support row). Anchors: every view row ("all") or view 0 ("one"); mean over anchors."""
    bsz, n_views = features.shape[:2]
    z = _stack_views(_normalized(features, normalize))
    y = torch.as_tensor(labels).reshape(-1).repeat(n_views)
    extra = None if support is None else _normalized(support, normalize)
    keys, y_keys = _with_extra(z, y, extra, support_labels)
    n_anchors = bsz if contrast_mode == "one" else bsz * n_views
    logits = z[:n_anchors] @ keys.T / temperature
    key_idx = torch.arange(keys.shape[0])
    losses = []
    for i in range(n_anchors):
        kept = key_idx != i
        positives = kept & (y_keys == y[i])
        if not bool(positives.any()):
            losses.append(_zero(logits[i]))
            continue
        log_p = logits[i] - _lse(logits[i][kept])
        losses.append(-_lse(log_p[positives]))
    return _mean(losses)


# ------------------------------------------------------------------------------------------
# SupCon L_out with extra (non-anchor) keys, e.g. a memory bank with labels
# ------------------------------------------------------------------------------------------
def supcon_extra_keys(features, labels, extra_keys, extra_key_labels, *, temperature=0.07,
                      base_temperature=None, contrast_mode="all"):
    """SupContrast's L_out where the keys are the B*V view rows followed by the E extra keys.

    Anchors: all B*V rows ("all") or the B rows of view 0 ("one"); extra keys are never anchors.
    P_i: keys (extra included) with the anchor's label, self excluded. c = t / base_t (1 if None).
    L_i = -(c/|P_i|) sum_{p in P_i} [ l_ip - log sum_{j != i} exp(l_ij) ]; 0 if P_i is empty
    (still counted in the mean).
    """
    bsz, n_views = features.shape[:2]
    z = _stack_views(features)
    y = _row_labels(labels, bsz, n_views)
    keys = torch.cat([z, extra_keys.to(torch.float64)], dim=0)
    y_keys = torch.cat([y, torch.as_tensor(extra_key_labels).reshape(-1).to(y.dtype)])
    c = 1.0 if base_temperature is None else temperature / base_temperature
    logits = z @ keys.T / temperature
    n_anchors = bsz if contrast_mode == "one" else bsz * n_views
    key_idx = torch.arange(keys.shape[0])
    losses = []
    for i in range(n_anchors):
        not_self = key_idx != i
        pos = (y_keys == y[i]) & not_self
        if not bool(pos.any()):
            losses.append(_zero(logits[i]))
            continue
        log_den = _lse(logits[i][not_self])
        losses.append(-c * (logits[i][pos] - log_den).mean())
    return _mean(losses)


def siglip(images: Tensor, texts: Tensor, logit_scale, logit_bias, labels=None, mask=None,
           negative_only: bool = False, per_row: bool = False) -> Tensor:
    """SigLIP: pair (i, j) is a binary decision, z_ij = +1 when text j is a match of image i, -1 otherwise; every
    pair adds log(1 + exp(-z_ij t_ij)) with t_ij = logit_scale * <image_i, text_j> + logit_bias (as
    max(u, 0) + log1p(e^-|u|), u = -z t: exact at any t, also where e^-|u| is far below 1); the total is divided by the number of images. Matches: i == j,
    or equal labels, or the mask's nonzero entries; none with negative_only. ``per_row``: each image's sum, [B], undivided."""
    x, y = images.to(torch.float64), texts.to(torch.float64)
    t = torch.as_tensor(logit_scale, dtype=torch.float64) * (x @ y.T) + torch.as_tensor(logit_bias, dtype=torch.float64)
    if negative_only:
        match = torch.zeros(t.shape, dtype=torch.bool)
    elif labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        match = labels[:, None] == labels[None, :]
    elif mask is not None:
        match = torch.as_tensor(mask) != 0
    else:
        match = torch.eye(*t.shape, dtype=torch.bool)
    z = match.to(torch.float64) * 2 - 1
    u = -z * t
    pair = u.clamp(min=0) + torch.log1p(torch.exp(-u.abs()))
    return pair.sum(1) if per_row else pair.sum() / x.shape[0]


# ------------------------------------------------------------------------------------------
# PaCo / GPaCo (Cui et al.): class centers as keys with their own temperature, alpha / beta / gamma,
# log-prior offsets on the centers' logits, label smoothing over the centers
# ------------------------------------------------------------------------------------------
def paco(features, labels, class_centers, *, alpha=1.0, beta=1.0, gamma=1.0, temperature=0.2,
         supervised_temperature=None, base_temperature=None, label_smoothing=0.0, logit_offsets=None,
         contrast_mode="one", normalize=False, extra_keys=None, extra_key_labels=None, rows=False):
    """For each anchor: center scores s_k = (q . c_k + o_k) / supt, key scores l_j = q . k_j / tau over the
    views and queue without the anchor itself; denominator sum_k exp(s_k) + gamma sum_j exp(l_j); the target
    puts beta (1 - eps) on the own center, beta eps / (C - 1) on each other one and alpha on each same-label
    key; the loss is -(tau / base) times the target-weighted mean of the log-probabilities. ``rows``: the
    per-anchor losses instead of their mean."""
    bsz, n_views = features.shape[:2]
    z = _stack_views(_normalized(features, normalize))
    y = torch.as_tensor(labels).reshape(-1).repeat(n_views)
    extra = None if extra_keys is None else _normalized(extra_keys, normalize)
    keys, y_keys = _with_extra(z, y, extra, extra_key_labels)
    centers = class_centers.to(torch.float64)
    n_classes = centers.shape[0]
    offsets = torch.zeros(n_classes, dtype=torch.float64) if logit_offsets is None else logit_offsets.double()
    supt = temperature if supervised_temperature is None else supervised_temperature
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    n_anchors = bsz if contrast_mode == "one" else bsz * n_views
    losses = []
    for i in range(n_anchors):
        key_scores = keys @ z[i] / temperature
        center_scores = (centers @ z[i] + offsets) / supt
        not_self = torch.arange(keys.shape[0]) != i
        parts = [center_scores] + ([key_scores[not_self] + math.log(gamma)] if gamma > 0 else [])
        log_den = _lse(torch.cat(parts))
        center_target = torch.full((n_classes,), beta * label_smoothing / max(n_classes - 1, 1),
                                   dtype=torch.float64)
        center_target[int(y[i])] = beta * (1 - label_smoothing)
        key_target = alpha * (not_self & (y_keys == y[i])).double()
        total = center_target.sum() + key_target.sum()
        if float(total) == 0:
            losses.append(_zero(key_scores))
            continue
        weighted = (center_target * (center_scores - log_den)).sum() + (key_target * (key_scores - log_den)).sum()
        losses.append(-scale * weighted / total)
    return torch.stack(losses) if rows else _mean(losses)


# ------------------------------------------------------------------------------------------
# TSC (Li et al., targeted supervised contrastive, MoCo form): own key, labelled queue, class targets
# ------------------------------------------------------------------------------------------
def tsc(query, key, labels, *, queue=None, queue_labels=None, targets=None, target_labels=None,
        target_weight=1.0, temperature=0.07, normalize=True, rows=False):
    """Anchor i's keys: its own key, the queue, the targets (only those; not the other samples' keys).
    log p over them; positives: the own key, the queue rows and the targets of the anchor's class, each
    counted once in Z; targets' log p weighted by target_weight; plus the cross-entropy of the own key."""
    q, k = query.double(), key.double()
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    empty = torch.zeros(0, q.shape[1], dtype=torch.float64)
    bank = empty if queue is None else (F.normalize(queue.double(), dim=-1) if normalize else queue.double())
    tgt = empty if targets is None else targets.double()
    bank_y = torch.zeros(0) if queue_labels is None else torch.as_tensor(queue_labels).reshape(-1).double()
    tgt_y = torch.zeros(0) if target_labels is None else torch.as_tensor(target_labels).reshape(-1).double()
    y = torch.as_tensor(labels).reshape(-1).double()
    losses = []
    for i in range(q.shape[0]):
        scores = torch.cat([(q[i] * k[i]).sum()[None], bank @ q[i], tgt @ q[i]]) / temperature
        log_p = scores - _lse(scores)
        own_mask = torch.zeros(scores.shape[0], dtype=torch.float64)
        own_mask[0] = 1
        bank_mask = torch.cat([torch.zeros(1), (bank_y == y[i]).double(), torch.zeros(tgt.shape[0])])
        tgt_mask = torch.cat([torch.zeros(1 + bank.shape[0]), (tgt_y == y[i]).double()])
        z_count = own_mask.sum() + bank_mask.sum() + tgt_mask.sum()
        class_part = ((own_mask + bank_mask) * log_p).sum() / z_count
        target_part = target_weight * (tgt_mask * log_p).sum() / z_count
        losses.append(-class_part - target_part - log_p[0])
    return torch.stack(losses) if rows else _mean(losses)


# ------------------------------------------------------------------------------------------
# eps-SupInfoNCE's L_in form and EpsilonSupCon (Barbano et al., Eq. 18)
# ------------------------------------------------------------------------------------------
def eps_supinfonce_in(features, labels=None, *, epsilon=0.1, temperature=0.1, base_temperature=None,
                      contrast_mode="all", extra_keys=None, extra_key_labels=None):
    """L_i = -c [log sum_p exp(l_ip) - log(exp(-eps) / |P_i| sum_p exp(l_ip) + sum_n exp(l_in))]; 0 without P."""
    return _eps_rows(features, labels, epsilon, temperature, base_temperature, contrast_mode, extra_keys,
                     extra_key_labels, form="in")


def epsilon_supcon(features, labels=None, *, epsilon=0.1, temperature=0.1, base_temperature=None,
                   contrast_mode="all", extra_keys=None, extra_key_labels=None):
    """L_i = -(c/|P_i|) sum_p [l_ip - log(sum_p' exp(l_ip' - eps) + sum_n exp(l_in))]; 0 without P."""
    return _eps_rows(features, labels, epsilon, temperature, base_temperature, contrast_mode, extra_keys,
                     extra_key_labels, form="eq18")


def _eps_rows(features, labels, epsilon, temperature, base_temperature, contrast_mode, extra_keys,
              extra_key_labels, form):
    bsz, n_views = features.shape[:2]
    z = _stack_views(features)
    y = _row_labels(labels, bsz, n_views)
    all_keys, y_keys = _with_extra(z, y, extra_keys, extra_key_labels)
    c = 1.0 if base_temperature is None else temperature / base_temperature
    logits = z @ all_keys.T / temperature
    n_anchors = bsz if contrast_mode == "one" else bsz * n_views
    keys = torch.arange(all_keys.shape[0])
    losses = []
    for i in range(n_anchors):
        pos = (y_keys == y[i]) & (keys != i)
        neg = y_keys != y[i]
        if not bool(pos.any()):
            losses.append(_zero(logits[i]))
            continue
        l_pos, l_neg = logits[i][pos], logits[i][neg]
        if form == "out":  # each positive against its own denominator: exp(l_ip - eps) + sum_n exp(l_in)
            terms = torch.cat([(l_pos - epsilon)[:, None], l_neg[None, :].expand(l_pos.numel(), -1)], dim=1)
            losses.append(-(c / l_pos.numel()) * (l_pos - torch.logsumexp(terms, dim=1)).sum())
        elif form == "in":
            weight = math.log(pos.sum().item())
            log_den = _lse(torch.cat([l_pos - epsilon - weight, l_neg]))
            losses.append(-c * (_lse(l_pos) - log_den))
        else:
            log_den = _lse(torch.cat([l_pos - epsilon, l_neg]))
            losses.append(-(c / l_pos.numel()) * (l_pos - log_den).sum())
    return _mean(losses)


# ------------------------------------------------------------------------------------------
# FairKL (Barbano et al.): moments of the similarities per (label, bias) agreement group
# ------------------------------------------------------------------------------------------
def fairkl(features, labels, bias_labels, *, temperature=1.0, kld=1.0, normalize=False):
    """Dense: s = Z Z^T / tau over the view rows (self pairs included); per group (same label or not x same
    bias or not) the mean over its pairs and the unbiased std of s masked to the group over all N^2 entries."""
    bsz, n_views = features.shape[:2]
    z = _stack_views(_normalized(features, normalize))
    y = torch.as_tensor(labels).reshape(-1).repeat(n_views)
    b = torch.as_tensor(bias_labels).reshape(-1).repeat(n_views)
    s = z @ z.T / temperature
    same_y, same_b = y[:, None] == y[None, :], b[:, None] == b[None, :]
    masks = {"pa": same_y & same_b, "pc": same_y & ~same_b, "na": ~same_y & same_b, "nc": ~same_y & ~same_b}
    mu = {k: (s * m).sum() / max(int(m.sum()), 1) for k, m in masks.items()}
    sd = {k: (s * m).std() if bool(m.any()) else torch.zeros((), dtype=torch.float64) for k, m in masks.items()}
    return ((mu["pc"] - mu["pa"]) ** 2 + (mu["na"] - mu["nc"]) ** 2
            + kld * ((sd["pa"] - sd["pc"]) ** 2 + (sd["na"] - sd["nc"]) ** 2) - mu["pc"] + mu["na"])


# Soft targets. SCE (Denize et al.): a cross-entropy against lam * one-hot + (1 - lam) * the teacher's
# softmax over the non-positive keys; CoMatch (Li et al.): against a thresholded, row-normalised
# pseudo-label graph with self-loops. Row i's positive is key i; queue / bank rows follow the batch keys.
# ------------------------------------------------------------------------------------------
def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.to(torch.float64), dim=1)


def sce(query, key, teacher=None, *, queue=None, teacher_queue=None, temperature=0.1, teacher_temperature=0.07,
        lam=0.5, normalize=False, weight=None, reduction="mean"):
    q, k = query.to(torch.float64), key.to(torch.float64)
    t = (key if teacher is None else teacher).detach().to(torch.float64)
    if queue is not None:
        k = torch.cat([k, queue.detach().to(torch.float64)])
        tq = queue if teacher is None else teacher_queue
        t_keys = torch.cat([t, tq.detach().to(torch.float64)])
    else:
        t_keys = t
    if normalize:
        q, k, t, t_keys = _unit(q), _unit(k), _unit(t), _unit(t_keys)
    rows = []
    for i in range(q.shape[0]):
        logits = q[i] @ k.T / temperature
        log_p = logits - _lse(logits)
        others = [j for j in range(k.shape[0]) if j != i]
        target = torch.zeros(k.shape[0], dtype=torch.float64)
        if others:
            teach = (t[i] @ t_keys[others].T) / teacher_temperature
            target[others] = (1 - lam) * torch.exp(teach - _lse(teach))
            target[i] = lam
        else:  # nothing to spread over: the positive takes the whole target
            target[i] = 1.0
        rows.append(-(target * log_p).sum())
    return _reduce_pairs(torch.stack(rows), weight, reduction)


def comatch(query, key, probs, *, bank=None, bank_probs=None, temperature=0.2, threshold=0.8, normalize=False,
            weight=None, reduction="mean"):
    q, k = query.to(torch.float64), key.to(torch.float64)
    p = probs.detach().to(torch.float64)
    p_keys = p
    if bank is not None:
        k = torch.cat([k, bank.detach().to(torch.float64)])
        p_keys = torch.cat([p, bank_probs.detach().to(torch.float64)])
    if normalize:
        q, k = _unit(q), _unit(k)
    rows = []
    for i in range(q.shape[0]):
        logits = q[i] @ k.T / temperature
        log_p = logits - _lse(logits)
        graph = p_keys @ p[i]
        graph[i] = 1.0  # self-loop
        graph = torch.where(graph >= threshold, graph, torch.zeros_like(graph))
        rows.append(-(graph / graph.sum() * log_p).sum())
    return _reduce_pairs(torch.stack(rows), weight, reduction)


def _reduce_pairs(rows: Tensor, weight, reduction: str) -> Tensor:
    w = torch.ones_like(rows) if weight is None else weight.to(torch.float64)
    if reduction == "none":
        return w * rows
    total = (w * rows).sum()
    if reduction == "sum":
        return total
    return total / w.sum() if float(w.sum()) > 0 else total * 0


# ------------------------------------------------------------------------------------------
# RényiCL (Lee et al.): per target view, a self-normalised e^{(gamma-1) l} average of the positive logits
# (negated) plus the ratio of alpha-mixed e^{gamma l}-weighted means of all logits; weights are constants.
# ------------------------------------------------------------------------------------------
def renyicl(sources, targets, *, temperature=0.5, alpha=1.0 / 65536, gamma=2.0, normalize=True):
    src, tgt = sources.to(torch.float64), targets.to(torch.float64)
    if normalize:
        src = torch.nn.functional.normalize(src, dim=-1)
        tgt = torch.nn.functional.normalize(tgt, dim=-1)
    n, views = src.shape[0], src.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    for t in range(2):
        positives, negatives = [], []
        for s in range(views):
            if s == t:
                continue
            for i in range(n):
                for j in range(n):
                    logit = src[i, s] @ tgt[j, t] / temperature
                    (positives if i == j else negatives).append(logit)
        pos, neg = torch.stack(positives), torch.stack(negatives)
        if gamma == 1:
            first = -pos.mean()
        else:
            w = torch.exp((gamma - 1) * pos).detach()
            first = -(w * pos).sum() / w.sum()
        wp, wn = torch.exp(gamma * pos).detach(), torch.exp(gamma * neg).detach()
        second = ((alpha * (wp * pos).mean() + (1 - alpha) * (wn * neg).mean())
                  / (alpha * wp.mean() + (1 - alpha) * wn.mean()))
        total = total + first + second
    return total


# ------------------------------------------------------------------------------------------
# CACR (Zheng et al.), their two loss functions term by term: attraction over a sample's other views, weights
# softmax(+tau_pos d); repulsion over the other samples of a second view, weights softmax(-tau_neg d); weights
# not detached. choice drops either weighting; debiased (Euclidean); the RBF cost e^{-t d} inside a log-mean.
# Euclidean: per-sample rows (attraction over the query views / V + each pair's anchor repulsion / pairs).
# ------------------------------------------------------------------------------------------
def cacr(features, *, alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=1.0, normalize=False, cost="euclidean", choice="full",
         debiased=False, tau_plus=0.1, rbf_t=2.0, reduction="mean", weight=None):
    z = features.to(torch.float64)
    if normalize:
        z = torch.nn.functional.normalize(z, dim=-1)
    n, views = z.shape[0], z.shape[1]
    pull_rows = torch.zeros(n, dtype=torch.float64)
    for x in range(views):
        for i in range(n):
            d = torch.stack([((z[i, x] - z[i, p]) ** 2).sum() for p in range(views) if p != x])
            w = torch.softmax(tau_pos * d, 0) if choice in ("full", "without_w2") else torch.full_like(d, 1 / len(d))
            pull_rows = pull_rows + torch.eye(n, dtype=torch.float64)[i] * (alpha * d * w).sum()
    pull_rows = pull_rows / views
    pairs = [(x, y) for x in range(views) for y in range(x + 1, views)]
    weighted = choice in ("full", "without_w1")
    push_rows, push_batch = torch.zeros(n, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for x, y in pairs:
        rows, costs = [], []
        for i in range(n):
            d = torch.stack([((z[i, x] - z[j, y]) ** 2).sum() for j in range(n) if j != i])
            w = torch.softmax(-tau_neg * d, 0) if weighted else torch.full_like(d, 1 / len(d))
            if cost == "rbf":
                rows.append((torch.exp(-rbf_t * d) * w).sum())
                costs.append(torch.exp(-rbf_t * d))
            else:
                r = (-beta * d * w).sum()
                if debiased:
                    r = (-tau_plus * ((z[i, x] - z[i, y]) ** 2).sum() + r) / (1 - tau_plus)
                rows.append(r)
        if cost == "rbf":
            push_batch = push_batch + beta * torch.log(torch.stack(rows).mean() if weighted else torch.cat(costs).mean())
        else:
            push_rows = push_rows + torch.stack(rows)
    if cost == "rbf":
        return pull_rows.mean() + push_batch / len(pairs)
    return _reduce_pairs(pull_rows + push_rows / len(pairs), weight, reduction)
