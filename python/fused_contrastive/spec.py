"""The description of one contrastive loss that travels from the API to every backend.

Notation follows DESIGN.md: anchors ``Q [Na, D]`` (rows), keys ``K [M, D]``
(columns), ``l_ij = q_i . k_j / tau``. The spec holds only O(Na + M) metadata
(label vectors, a self offset) or, when the user passed one, the small dense
``[B, B]`` mask that SupContrast's API allows; never an ``[Na, M]`` tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

NO_POSITIVE_MODES = ("zero", "exclude")
VARIANTS = ("out", "in")  # SupCon's L_out (mean of positive log-probabilities) and L_in (log of their mean)
# Row losses beyond the general form (DESIGN.md's exception table): "eps" is epsilon-SupInfoNCE (one
# denominator per positive, needs LSE_N before the positive sum); "debiased" is Chuang et al.'s debiased
# negative term with Robinson et al.'s hard-negative reweighting (three LSEs over the negatives).
ALL_VARIANTS = VARIANTS + ("eps", "debiased")


@dataclass(frozen=True)
class DenominatorBias:
    """The denominator log-weights b_ij from O(N) metadata: ``b_ij = same[g_j]`` when key j's group equals
    anchor i's group, else ``other[g_j]``; ``-inf`` removes the key from anchor i's denominator.
    Covers DCL (positives out), class-conditional InfoNCE (other classes out), BCL (minus the log of the
    key's class count) and InfoNCE without in-batch negatives (other batch keys out, queue in)."""
    anchor_groups: Tensor  # [Na] int64 in [0, G)
    key_groups: Tensor  # [M] int64 in [0, G)
    same: Tensor  # [G] in the accumulation dtype
    other: Tensor  # [G]

    def tile(self, rows: Tensor, cols: Optional[Tensor] = None) -> Tensor:
        """Dense b for anchor ``rows`` against keys ``cols`` (all keys by default): [len(rows), len(cols)]."""
        key_groups = self.key_groups if cols is None else self.key_groups[cols]
        same_group = self.anchor_groups[rows][:, None] == key_groups[None, :]
        return torch.where(same_group, self.same[key_groups][None, :], self.other[key_groups][None, :])
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default


@dataclass(frozen=True)
class ContrastSpec:
    anchors: Tensor  # Q [Na, D]; may be keys itself or a leading slice of it
    keys: Tensor  # K [M, D]
    # Key index of anchor i's "self" is i + self_offset; None when anchors have no self among the keys.
    self_offset: Optional[int]
    # Positive rule, exactly one of the two:
    #  labels: a_ij = 1 when anchor_labels[i] == key_labels[j] (class ids in [0, num_classes))
    #  mask:   a_ij = mask[i % mask.shape[0], j % mask.shape[1]] (uint8 for a 0/1 mask, else float weights >= 0)
    # Either way a_ii(self) = 0 and self is out of the denominator.
    anchor_labels: Optional[Tensor]
    key_labels: Optional[Tensor]
    num_classes: int
    mask: Optional[Tensor]
    temperature: Union[float, Tensor]  # tau; a 0-dim tensor when it may need a gradient
    base_temperature: Optional[float]  # None: c = 1, else c = tau / base_temperature
    no_positive: str  # "zero": anchors without positives count in the mean with loss 0; "exclude": they don't
    normalize: bool = False  # L2-normalise every anchor and key row first (F.normalize semantics, eps 1e-12)
    tau_float: float = 0.0  # the temperature's value, read once when the spec is built
    # How the rows L_i become the result: "mean" sum_i w_i L_i / sum_{i counted} w_i, "sum" sum_i w_i L_i,
    # "none" the rows w_i L_i themselves ([Na]); w_i = row_weight[i], 1 when None (see reduction_coef).
    reduction: str = "mean"
    # "out": L_i = c (LSE_A - sum_j a_ij l_ij / Z_i);  "in": L_i = c (LSE_A - LSE_P + log Z_i), with
    # LSE_P = log sum_j a_ij exp(l_ij) (DESIGN.md's exception table).
    variant: str = "out"
    den_bias: Optional[DenominatorBias] = None  # None: b_ij = 0 on every key but self
    # w_i multiplying the positive term (DCLW's detached pair weight): L_i = c (LSE - w_i sum_j a_ij l_ij / Z_i).
    pos_row_weight: Optional[Tensor] = None
    epsilon: float = 0.0  # "eps": the margin subtracted from each positive's logit in its own denominator
    tau_plus: float = 0.0  # "debiased": the class prior of a false negative
    beta: float = 0.0  # "debiased": hard-negative concentration (0: Chuang et al. alone)
    row_weight: Optional[Tensor] = None  # [Na] per-anchor weights w_i >= 0 of the reduction (None: all 1)

    def normalized_inputs(self) -> tuple[Tensor, Tensor]:
        """(anchors, keys), L2-normalised by differentiable torch ops when the spec asks for it, in the
        accumulation dtype: in fp16 the eps 1e-12 underflows to 0, so a zero row would give 0 / 0 = NaN.
        The fused kernels call normalize_rows and normalize_backward."""
        if not self.normalize:
            return self.anchors, self.keys
        keys = normalize_rows(self.keys, self.accum_dtype)
        anchors = keys if self.anchors_are_keys else normalize_rows(self.anchors, self.accum_dtype)
        return anchors, keys

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    @property
    def num_keys(self) -> int:
        return self.keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def accum_dtype(self) -> torch.dtype:
        """fp32 accumulation for fp32/fp16/bf16 inputs; float64 stays float64 (the test oracle's dtype)."""
        return torch.float64 if self.keys.dtype == torch.float64 else torch.float32

    @property
    def anchors_are_keys(self) -> bool:
        return self.anchors is self.keys

    def tau_value(self) -> float:
        return self.tau_float

    def self_columns(self) -> Tensor:
        """Key index of each anchor's self, -1 where it has none (out of range or no self)."""
        rows = torch.arange(self.num_anchors, device=self.device)
        if self.self_offset is None:
            return torch.full_like(rows, -1)
        cols = rows + self.self_offset
        return torch.where((cols >= 0) & (cols < self.num_keys), cols, torch.full_like(cols, -1))

    def den_count(self) -> Tensor:
        """How many keys are in each anchor's denominator (not self, b_ij > -inf), from metadata only."""
        acc = self.accum_dtype
        self_cols = self.self_columns()
        has_self = self_cols >= 0
        if self.den_bias is None:
            return (self.num_keys - has_self.long()).to(acc)
        bias = self.den_bias
        group_size = torch.zeros(bias.same.shape[0], dtype=acc, device=self.device)
        group_size.index_add_(0, bias.key_groups, torch.ones(self.num_keys, dtype=acc, device=self.device))
        same_in, other_in = (bias.same > float("-inf")).to(acc), (bias.other > float("-inf")).to(acc)
        g = bias.anchor_groups
        count = (group_size * other_in).sum() + group_size[g] * (same_in[g] - other_in[g])
        self_group = bias.key_groups[self_cols.clamp(min=0)]
        self_in = torch.where(self_group == g, same_in[self_group], other_in[self_group])
        return count - torch.where(has_self, self_in, torch.zeros_like(self_in))

    def pos_count(self) -> Tensor:
        """Z_i = sum_j a_ij (self excluded), from O(N) metadata only, in the accumulation dtype."""
        acc = self.accum_dtype
        self_cols = self.self_columns()
        has_self = self_cols >= 0
        safe_self = self_cols.clamp(min=0)
        if self.mask is None:
            # index_add, not bincount: bincount's output size needs the max on the host (a GPU sync).
            class_count = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
            class_count.index_add_(0, self.key_labels, torch.ones_like(self.key_labels))
            count = class_count[self.anchor_labels]
            self_is_positive = has_self & (self.key_labels[safe_self] == self.anchor_labels)
            return (count - self_is_positive.long()).to(acc)
        mask = self.mask.to(acc)
        rows_b, cols_b = mask.shape
        # How many keys fall on each mask column, so the row sum needs no [Na, M] tensor.
        key_columns = torch.arange(self.num_keys, device=self.device) % cols_b
        keys_per_column = torch.zeros(cols_b, dtype=acc, device=self.device)
        keys_per_column.index_add_(0, key_columns, torch.ones(self.num_keys, dtype=acc, device=self.device))
        mask_rows = mask[torch.arange(self.num_anchors, device=self.device) % rows_b]
        z = mask_rows @ keys_per_column
        self_weight = mask_rows.gather(1, (safe_self % cols_b)[:, None])[:, 0]
        return z - torch.where(has_self, self_weight, torch.zeros_like(self_weight))


def _scaled_norm(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x / s, |x / s|, s, |x|) per row with s = max_k |x_k|: the squares of x itself overflow in fp32 from
    |x| ~ 1e19 (then |x| = inf and x / |x| is a zero vector), those of x / s lie in [1, D]. s is a constant to autograd: x / |x| does not depend on it. On a zero row
    s and |x / s| are 1 (no 0 / 0) and |x| is 0; |x| may be inf."""
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    nonzero = scale > 0
    scale = torch.where(nonzero, scale, torch.ones_like(scale))
    unit = x / scale
    unit_norm = torch.linalg.vector_norm(unit, dim=1, keepdim=True)
    norm = torch.where(nonzero, unit_norm.detach() * scale, torch.zeros_like(scale))
    return unit, torch.where(nonzero, unit_norm, torch.ones_like(unit_norm)), scale, norm


def normalize_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x / max(|x|, eps) row by row in ``dtype`` (F.normalize's value, eps 1e-12), differentiable, finite
    for every finite x, with the norm taken of the row scaled to max |x_k| = 1 (see _scaled_norm)."""
    xf = x.to(dtype)
    unit, unit_norm, _, norm = _scaled_norm(xf)
    return torch.where(norm >= NORMALIZE_EPS, unit / unit_norm, xf / NORMALIZE_EPS)


def normalize_backward(x: Tensor, grad_normalized: Tensor) -> Tensor:
    """Gradient w.r.t. x of y = x / max(|x|, eps) (F.normalize), given dL/dy; in fp32 or wider:
    (dL/dy - y (y . dL/dy)) / |x| where |x| >= eps, dL/dy / eps below. |x| is never formed where it would
    overflow: the division is by |x / s| and then by s."""
    grad_normalized = grad_normalized.to(torch.promote_types(grad_normalized.dtype, torch.float32))
    xf = x.to(grad_normalized.dtype)
    unit, unit_norm, scale, norm = _scaled_norm(xf)
    y = unit / unit_norm
    projected = grad_normalized - y * (y * grad_normalized).sum(1, keepdim=True)
    return torch.where(norm >= NORMALIZE_EPS, projected / unit_norm / scale, grad_normalized / NORMALIZE_EPS)


def inverse_pos_count(pos_count: Tensor) -> Tensor:
    """1 / Z_i, and 0 on rows without positives (they contribute neither loss nor gradient)."""
    has_pos = pos_count > 0
    return torch.where(has_pos, 1.0 / torch.where(has_pos, pos_count, torch.ones_like(pos_count)), 0.0)


def positive_scale(spec: ContrastSpec, pos_count: Tensor) -> Tensor:
    """w_i / Z_i: the factor of sum_j a_ij l_ij in L_out (0 on rows without positives)."""
    scale = inverse_pos_count(pos_count)
    return scale if spec.pos_row_weight is None else scale * spec.pos_row_weight.to(scale.dtype)


def row_losses(spec: ContrastSpec, lse: Tensor, pos_stat: Tensor, pos_count: Tensor, c) -> Tensor:
    """L_i from the per-row statistics every backend saves: ``pos_stat`` is sum_j a_ij l_ij (L_out)
    or LSE_P (L_in). Exactly 0 on rows without positives."""
    has_pos = pos_count > 0
    if spec.variant == "in":
        log_count = torch.log(torch.where(has_pos, pos_count, torch.ones_like(pos_count)))
        return torch.where(has_pos, c * (lse - pos_stat + log_count), 0.0)
    return torch.where(has_pos, c * (lse - pos_stat * positive_scale(spec, pos_count)), 0.0)


def debiased_row_losses(spec: ContrastSpec, lse_n: Tensor, pos_logit: Tensor, n: Tensor, tau,
                        log_reweighted: Optional[Tensor] = None) -> Tensor:
    """Chuang et al.'s debiased loss per row from its statistics: -log(e^{l_p} / (e^{l_p} + Ng)) with
    Ng = max((reweighted - tau+ n e^{l_p}) / (1 - tau+), n e^{-1/tau}); ``log_reweighted`` is
    log(n sum_n e^{(1+beta) l} / sum_n e^{beta l}) (Robinson et al.), LSE_N when beta = 0. In log space,
    shifted by s = max(log reweighted, l_p), so nothing overflows at small tau. Differentiable (autograd)."""
    if log_reweighted is None:
        log_reweighted = lse_n
    shift = torch.maximum(log_reweighted, pos_logit).detach()
    one_minus = 1.0 - spec.tau_plus
    numerator = torch.exp(log_reweighted - shift) - spec.tau_plus * n * torch.exp(pos_logit - shift)
    floor = one_minus * n * torch.exp(-1.0 / tau - shift)  # n e^{-1/tau}: every negative at cosine -1
    ng = torch.maximum(numerator, floor) / one_minus
    return torch.log(torch.exp(pos_logit - shift) + ng) + shift - pos_logit


REDUCTIONS = ("mean", "sum", "none")


def counted_weight(spec: ContrastSpec, has_pos: Tensor) -> Tensor:
    """[Na]: w_i on the rows the mean counts (every row with no_positive="zero", rows with a positive with
    "exclude"), 0 elsewhere; w_i = 1 without weights."""
    acc = spec.accum_dtype
    counted = has_pos if spec.no_positive == "exclude" else torch.ones_like(has_pos)
    w = counted.to(acc)
    return w if spec.row_weight is None else w * spec.row_weight.to(acc)


def mean_divisor(spec: ContrastSpec, has_pos: Tensor) -> Tensor:
    """What the mean divides sum_i w_i L_i by: the sum of the counted weights (the count of counted anchors
    without weights); 1 where that is 0 (the loss is then 0, never NaN) and for "sum"."""
    if spec.reduction != "mean":
        return torch.ones((), dtype=spec.accum_dtype, device=has_pos.device)
    if spec.row_weight is None and spec.no_positive != "exclude":
        return torch.full((), spec.num_anchors, dtype=spec.accum_dtype, device=has_pos.device).clamp(min=1)
    else:
        total = counted_weight(spec, has_pos).sum()
    return torch.where(total > 0, total, torch.ones_like(total))


def reduction_coef(spec: ContrastSpec, has_pos: Tensor) -> Tensor:
    """[Na] coef_i = dResult/dL_i of a "mean" or "sum" spec: the result is sum_i coef_i L_i. Every backend
    scales row i of its gradient tile by coef_i; "none" gets the per-row gradient from autograd instead."""
    acc = spec.accum_dtype
    coef = torch.ones(has_pos.shape, dtype=acc, device=has_pos.device)
    if spec.row_weight is not None:
        coef = coef * spec.row_weight.to(acc)
    return coef / mean_divisor(spec, has_pos)


def reduce_rows(spec: ContrastSpec, rows: Tensor, has_pos: Tensor) -> Tensor:
    """The spec's result from the per-row losses L_i (0 on rows without positives), by ordinary
    differentiable torch ops: gradients reach the rows (and the weights) through autograd."""
    if spec.row_weight is not None:
        rows = rows * spec.row_weight.to(rows.dtype)
    if spec.reduction == "none":
        return rows
    return rows.sum() / mean_divisor(spec, has_pos)


def weight_grad(spec: ContrastSpec, rows: Tensor, has_pos: Tensor, loss: Tensor) -> Tensor:
    """dResult/dw_i of a "mean" or "sum" spec with weights (its own divisor): L_i, minus the result times
    the row's share of the divisor for the mean."""
    if spec.reduction == "sum":
        return rows
    counted = has_pos if spec.no_positive == "exclude" else torch.ones_like(has_pos)
    return (rows - loss * counted.to(rows.dtype)) / mean_divisor(spec, has_pos)


def temperature_grad(spec: ContrastSpec, Q: Tensor, dQ: Tensor, loss: Tensor, tau: float) -> Tensor:
    """dLoss/dtau from dQ: l_ij is linear in 1/tau, so sum_ij g_ij l_ij = sum_i q_i . dQ_i, and
    dtau = -(1/tau) sum_i q_i . dQ_i; the scale c = tau / base_tau adds loss / tau when a base is given."""
    acc = spec.accum_dtype
    dtau = -(Q.to(acc) * dQ.to(acc)).sum() / tau
    if spec.base_temperature is not None:
        dtau = dtau + loss / tau
    return dtau
