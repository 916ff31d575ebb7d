"""SupCon / SimCLR (docs/design.md, "The general loss", with a_ij in {labels, dense mask}) as fused Triton kernels.

Read top to bottom: the three kernels (forward; dQ row-parallel; dK column-parallel),
their launchers (grid, autotuning, argument plumbing), and the ``loss(spec)`` entries that
fused_contrastive's dispatcher calls (the autograd.Function above the launchers is shared with
the CUDA backend: ``fused_contrastive.fused``).

Every tile of logits ``l = Q_blk K_blk^T / tau`` lives in registers only. The forward
keeps per row a running max ``m`` and running ``sum exp(l - m)`` and saves ``lse`` (fp32).
The backward recomputes each tile from ``lse``: ``g = coef_i * (exp(l - lse_i) - a_ij / Z_i)``
(``coef_i`` carries dLoss/dL_i and the scale c), then ``dQ = g K / tau`` in one kernel and
``dK = g^T Q / tau`` in another: no atomics, so results are bit-deterministic. For L_out the
positive part (``pos_sum = sum_j a_ij l_ij`` and the ``a_ij / Z_i`` term of ``g``) is linear in
the rows, so the launchers form it from per-class sums (labels) or per-mask-column sums (the
user's ``[B, B]`` mask) in O((Na + M) D) and the tile loops only see the denominator; L_in and
epsilon-SupInfoNCE read labels or the mask (bytes for a 0/1 mask, fp32 weights otherwise) tile
by tile. Nothing of size Na x M is ever written.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os

import torch
import triton
import triton.language as tl

from fused_contrastive import fused
from fused_contrastive.spec import normalize_rows

# ----------------------------------------------------------------------------- kernels
#
# Every exponential is an exp2 whose argument is one fused multiply-add, x * unit2 - shift2, with log2(e)
# folded into the per-row shift and into the unit: for L_out and the debiased form without a bias table
# the tile keeps the raw products s = q . k (unit2 = log2(e) / tau), saving the multiply by 1/tau; the
# other forms scale to natural logits first (unit2 = log2(e)). Maxima and LSEs stay in the tile's units
# and natural logs, so a row with one key has LSE equal to its logit exactly.
#
# Each program walks its tiles in two loops: the full tiles that hold no self column first, with no
# predicate at all, then the few that need one (the tiles holding a self column of this block, and the
# ragged last tile). At large N almost every tile is in the first loop.

LOG2E = tl.constexpr(1.4426950408889634)

# L_in (variant 1) and epsilon-SupInfoNCE (2) read a_ij in the tile loop. L_out and the debiased forms need
# only sum_j a_ij l_ij = q_i . (sum_j a_ij k_j) / tau and its gradient, which the launcher forms from
# per-class (or per-mask-column) sums of rows in O((Na + M) D): their tile loops read no label or mask.
_POSITIVES_IN_LOOP = (1, 2)


@triton.jit
def _row_offset(idx, stride, OFFSETS_64: tl.constexpr):
    """idx * stride, in int64 when the launcher saw that N * stride can pass 2**31 (an int32 overflow would
    read wrong rows); int32 otherwise, which saves the registers of 64-bit address arithmetic."""
    if OFFSETS_64:
        return idx.to(tl.int64) * stride
    return idx * stride


@triton.jit
def _load_rows(X, idx, ok, offs_d, D, stride_m, stride_d, DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Rows X[idx] as a [len(idx), BLOCK_D] tile, zero past D (padding without a copy) and, when CHECK_ROWS,
    on rows outside ``ok``."""
    if CHECK_ROWS:
        in_range = ok[:, None] & (offs_d[None, :] < D)
    else:  # a full tile: only the padding past D (the mask broadcasts over the rows)
        in_range = offs_d[None, :] < D
    x = tl.load(X + _row_offset(idx, stride_m, OFFSETS_64)[:, None] + offs_d[None, :] * stride_d,
                mask=in_range, other=0.0)
    if DOT_IN_FP32:  # Triton's interpreter multiplies bf16 bit patterns in tl.dot; only it sets this
        x = x.to(tl.float32)
    return x


@triton.jit
def _self_tiles(first, n_full, SPAN: tl.constexpr, TILE: tl.constexpr, HAS_SELF: tl.constexpr):
    """[lo, hi): the full tiles (of TILE indices, n_full of them) that hold the self index of one of this
    program's SPAN rows, whose self indices are first .. first + SPAN - 1 (some may be out of range)."""
    if HAS_SELF:
        lo = tl.maximum(first, 0)
        last = tl.minimum(first + SPAN - 1, n_full * TILE - 1)
        tile_lo = lo // TILE
        tile_hi = tl.where(last >= lo, last // TILE + 1, tile_lo)
    else:
        tile_lo = n_full * 0
        tile_hi = tile_lo
    return tile_lo, tile_hi


@triton.jit
def _plain_tile(t, tile_lo, tile_hi):
    """The t-th full tile that holds no self index: tiles tile_lo .. tile_hi - 1 are skipped."""
    return t + tl.where(t >= tile_lo, tile_hi - tile_lo, 0)


@triton.jit
def _checked_tile(t, tile_lo, tile_hi, n_full):
    """The t-th tile that needs the predicate: the self tiles, then the ragged last one (index n_full)."""
    return tl.where(t < tile_hi - tile_lo, tile_lo + t, n_full)


@triton.jit
def _positive_weights(rows, cols, row_ok, valid, anchor_label, KL, MASK, mask_rows, mask_cols, stride_mm,
                      USE_MASK: tl.constexpr, ACC: tl.constexpr, OFFSETS_64: tl.constexpr):
    """a_ij for one tile (0 outside ``valid``), from labels or the [B, B] mask (column stride 1)."""
    if USE_MASK:
        a = tl.load(MASK + _row_offset(rows % mask_rows, stride_mm, OFFSETS_64)[:, None] + (cols % mask_cols)[None, :],
                    mask=row_ok[:, None] & valid, other=0).to(ACC)
    else:
        key_label = tl.load(KL + cols, mask=cols >= 0, other=-1)
        a = tl.where(valid & (anchor_label[:, None] == key_label[None, :]), 1.0, 0.0).to(ACC)
    return a


@triton.jit
def _anchor_label(AL, rows, row_ok, USE_MASK: tl.constexpr):
    """Anchor rows' labels; with a mask the row index itself (the mask is indexed by it)."""
    if USE_MASK:
        label = rows
    else:
        label = tl.load(AL + rows, mask=row_ok, other=-2)
    return label


@triton.jit
def _in_denominator(rows, cols, row_ok, col_ok, self_offset, HAS_SELF: tl.constexpr):
    """[rows, cols] True for the keys of each anchor's denominator: in range and not its self."""
    valid = row_ok[:, None] & col_ok[None, :]
    if HAS_SELF:
        valid = valid & (cols[None, :] != (rows + self_offset)[:, None])
    return valid


@triton.jit
def _den_bias(rows, cols, row_ok, col_ok, AG, KG, B_SAME, B_OTHER, DEN_BIAS: tl.constexpr):
    """b_ij for one tile: same[g_j] when key j's group is anchor i's, else other[g_j] (-inf: not in the
    denominator); the constant 0 without a bias, which the compiler folds away."""
    if DEN_BIAS:
        anchor_group = tl.load(AG + rows, mask=row_ok, other=0)
        key_group = tl.load(KG + cols, mask=col_ok, other=0)
        same = tl.load(B_SAME + key_group, mask=col_ok, other=0.0)
        other = tl.load(B_OTHER + key_group, mask=col_ok, other=0.0)
        bias = tl.where(anchor_group[:, None] == key_group[None, :], same[None, :], other[None, :])
    else:
        bias = 0.0
    return bias


@triton.jit
def _backward_row_stats(rows, row_ok, Na, LSE, COEF, POS_SCALE, DEN_SCALE, VARIANT: tl.constexpr):
    """The saved per-anchor statistics the backward tile needs, LSEs times log2(e) (0 for a row without
    keys): LSE, coef, the positive scale (L_in: LSE_P, also times log2(e)) and (row functions only) the denominator
    scales: u_i for e^{l + b - LSE}, and with hard negatives (variant 4) also those of the (1+beta) and beta
    log-sum-exps, whose LSEs follow LSE ([3, Na] buffers)."""
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
    pos_scale = tl.load(POS_SCALE + rows, mask=row_ok, other=0.0)
    if VARIANT == 1:
        pos_scale = pos_scale * LOG2E
    den_scale = coef
    hard_lse_c = lse2
    hard_lse_b = lse2
    hard_scale_c = coef
    hard_scale_b = coef
    if VARIANT >= 2:
        den_scale = tl.load(DEN_SCALE + rows, mask=row_ok, other=0.0)
    if VARIANT == 4:
        hard_lse_c = tl.load(LSE + Na + rows, mask=row_ok, other=0.0)
        hard_lse_b = tl.load(LSE + 2 * Na + rows, mask=row_ok, other=0.0)
        hard_lse_c = tl.where(hard_lse_c == float("-inf"), 0.0, hard_lse_c * LOG2E)
        hard_lse_b = tl.where(hard_lse_b == float("-inf"), 0.0, hard_lse_b * LOG2E)
        hard_scale_c = tl.load(DEN_SCALE + Na + rows, mask=row_ok, other=0.0)
        hard_scale_b = tl.load(DEN_SCALE + 2 * Na + rows, mask=row_ok, other=0.0)
    return lse, lse2, coef, pos_scale, den_scale, hard_lse_c, hard_lse_b, hard_scale_c, hard_scale_b


@triton.jit
def _online_lse(m, total, x, unit2):
    """One tile's update of a running (max, sum of e^{(x - max) unit}) per row, unit2 = unit * log2(e); x may
    hold -inf (a row with no finite entry yet keeps a 0 shift, so exp2() stays finite)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    shift2 = tl.where(m_new == float("-inf"), 0.0, m_new) * unit2
    return m_new, total * tl.math.exp2(m * unit2 - shift2) + tl.sum(tl.math.exp2(x * unit2 - shift2[:, None]), 1)


@triton.jit
def _log_of_sum(m, total, unit):
    """log(total) + m * unit: the natural LSE of a running (max, sum), -inf for an empty sum."""
    return tl.where(total > 0, m * unit + tl.log(total), float("-inf"))


@triton.jit
def _softplus(x):
    """log(1 + e^x) without overflow, and 0 at x = -inf."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _row_tile(q, K, KL, MASK, start, rows, row_ok, anchor_label, offs_d, D, M, stride_km, stride_kd, stride_mm,
              self_offset, mask_rows, mask_cols, BLOCK_N: tl.constexpr, HAS_SELF: tl.constexpr,
              USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
              OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr, CHECKED: tl.constexpr):
    """For a row-parallel program, the key tile at ``start``: its columns, raw products s = q . k, keys, denominator
    predicate (in range, not self; all True on a tile that is not CHECKED) and positive weights (only where
    the loop needs them)."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    k = _load_rows(K, cols, col_ok, offs_d, D, stride_km, stride_kd, DOT_IN_FP32, OFFSETS_64, CHECKED)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
    if CHECKED:
        valid = _in_denominator(rows, cols, row_ok, col_ok, self_offset, HAS_SELF)
    else:
        valid = cols[None, :] >= 0
    if VARIANT == 1 or VARIANT == 2:  # see _POSITIVES_IN_LOOP
        a = _positive_weights(rows, tl.where(col_ok, cols, -1), row_ok, valid, anchor_label, KL, MASK,
                              mask_rows, mask_cols, stride_mm, USE_MASK, ACC, OFFSETS_64)
    else:
        a = 0.0
    return cols, col_ok, s, k, valid, a


@triton.jit
def _denominator_units(s, bias, inv_tau, scale2, RAW: tl.constexpr):
    """(x, unit, unit2): the tile in the units its online LSE runs in and the factors to natural logits and to
    base 2. RAW (L_out and the debiased form, no bias table: nothing else needs natural logits) keeps the raw
    products, so the scale by 1/tau rides in the exp2's multiply-add."""
    if RAW:
        return s, inv_tau, scale2
    return s * inv_tau + bias, 1.0, LOG2E


@triton.jit
def _fwd_step(m_i, sum_exp, pos_max, pos_exp, hard_max_c, hard_exp_c, hard_max_b, hard_exp_b,
              q, K, KL, MASK, AG, KG, B_SAME, B_OTHER, start, rows, row_ok, anchor_label, offs_d, D, M,
              stride_km, stride_kd, stride_mm, inv_tau, scale2, self_offset, mask_rows, mask_cols, beta,
              BLOCK_N: tl.constexpr, HAS_SELF: tl.constexpr, USE_MASK: tl.constexpr, PRECISION: tl.constexpr,
              ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr,
              DEN_BIAS: tl.constexpr, RAW: tl.constexpr, CHECKED: tl.constexpr):
    """One key tile of the forward's first pass: the online LSEs of the denominator (in the tile's units) and,
    for L_in, of the positives (natural logits)."""
    cols, col_ok, s, k, valid, a = _row_tile(q, K, KL, MASK, start, rows, row_ok, anchor_label, offs_d, D, M,
                                             stride_km, stride_kd, stride_mm, self_offset, mask_rows, mask_cols,
                                             BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC, DOT_IN_FP32, OFFSETS_64,
                                             VARIANT, CHECKED)
    if VARIANT == 1:  # L_in: log sum_j a_ij e^{l_ij}
        lp = tl.where(a > 0, s * inv_tau, float("-inf"))
        pos_max_new = tl.maximum(pos_max, tl.max(lp, 1))
        pos_shift2 = tl.where(pos_max_new == float("-inf"), 0.0, pos_max_new) * LOG2E
        pos_exp = pos_exp * tl.math.exp2(pos_max * LOG2E - pos_shift2) \
            + tl.sum(a * tl.math.exp2(lp * LOG2E - pos_shift2[:, None]), 1)
        pos_max = pos_max_new
    bias = _den_bias(rows, cols, row_ok, col_ok, AG, KG, B_SAME, B_OTHER, DEN_BIAS)
    x, unit, unit2 = _denominator_units(s, bias, inv_tau, scale2, RAW)
    if CHECKED:  # rows and columns outside the denominator become -inf before the max, not after
        x = tl.where(valid, x, float("-inf"))
    m_i, sum_exp = _online_lse(m_i, sum_exp, x, unit2)
    if VARIANT == 4:
        hard_max_c, hard_exp_c = _online_lse(hard_max_c, hard_exp_c, x * (1.0 + beta), LOG2E)
        hard_max_b, hard_exp_b = _online_lse(hard_max_b, hard_exp_b, x * beta, LOG2E)
    return m_i, sum_exp, pos_max, pos_exp, hard_max_c, hard_exp_c, hard_max_b, hard_exp_b


@triton.jit
def _supcon_fwd_kernel(
    Q, K, INV_TAU, AL, KL, MASK, AG, KG, B_SAME, B_OTHER, LSE, POS_SUM, POS_AUX,
    Na, M, D, self_offset, mask_rows, mask_cols, epsilon, beta,
    stride_qm, stride_qd, stride_km, stride_kd, stride_mm,
    N_BUCKET,  # autotuning key only
    HAS_SELF: tl.constexpr, USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr,
    DEN_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per anchor: LSE over the denominator; L_in: LSE_P (in POS_SUM); epsilon-SupInfoNCE: its positive sum
    (POS_SUM) and R (POS_AUX); hard negatives: two more LSEs (POS_AUX). L_out's sum_j a_ij l_ij is the
    launcher's (per-class sums)."""
    RAW: tl.constexpr = (VARIANT == 0 or VARIANT == 3) and not DEN_BIAS
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Na
    q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, OFFSETS_64, True)
    inv_tau = tl.load(INV_TAU)
    scale2 = inv_tau * LOG2E
    anchor_label = _anchor_label(AL, rows, row_ok, USE_MASK)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    sum_exp = tl.zeros([BLOCK_M], ACC)
    pos_max = tl.full([BLOCK_M], float("-inf"), ACC)  # L_in: online log sum_j a_ij e^{l_ij}
    pos_exp = tl.zeros([BLOCK_M], ACC)
    hard_max_c = tl.full([BLOCK_M], float("-inf"), ACC)  # variant 4: online LSE of (1+beta) l and of beta l
    hard_exp_c = tl.zeros([BLOCK_M], ACC)
    hard_max_b = tl.full([BLOCK_M], float("-inf"), ACC)
    hard_exp_b = tl.zeros([BLOCK_M], ACC)
    n_full = M // BLOCK_N
    tile_lo, tile_hi = _self_tiles(first_row + self_offset, n_full, BLOCK_M, BLOCK_N, HAS_SELF)
    for t in range(0, n_full - (tile_hi - tile_lo)):
        start = _plain_tile(t, tile_lo, tile_hi) * BLOCK_N
        m_i, sum_exp, pos_max, pos_exp, hard_max_c, hard_exp_c, hard_max_b, hard_exp_b = _fwd_step(
            m_i, sum_exp, pos_max, pos_exp, hard_max_c, hard_exp_c, hard_max_b, hard_exp_b, q, K, KL, MASK, AG, KG,
            B_SAME, B_OTHER, start, rows, row_ok, anchor_label, offs_d, D, M, stride_km, stride_kd, stride_mm,
            inv_tau, scale2, self_offset, mask_rows, mask_cols, beta, BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC,
            DOT_IN_FP32, OFFSETS_64, VARIANT, DEN_BIAS, RAW, False)
    for t in range(0, tile_hi - tile_lo + tl.cdiv(M, BLOCK_N) - n_full):
        start = _checked_tile(t, tile_lo, tile_hi, n_full) * BLOCK_N
        m_i, sum_exp, pos_max, pos_exp, hard_max_c, hard_exp_c, hard_max_b, hard_exp_b = _fwd_step(
            m_i, sum_exp, pos_max, pos_exp, hard_max_c, hard_exp_c, hard_max_b, hard_exp_b, q, K, KL, MASK, AG, KG,
            B_SAME, B_OTHER, start, rows, row_ok, anchor_label, offs_d, D, M, stride_km, stride_kd, stride_mm,
            inv_tau, scale2, self_offset, mask_rows, mask_cols, beta, BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC,
            DOT_IN_FP32, OFFSETS_64, VARIANT, DEN_BIAS, RAW, True)
    if RAW:
        lse = _log_of_sum(m_i, sum_exp, inv_tau)
    else:
        lse = _log_of_sum(m_i, sum_exp, 1.0)
    if VARIANT == 1:
        tl.store(POS_SUM + rows, _log_of_sum(pos_max, pos_exp, 1.0), mask=row_ok)
    if VARIANT == 2:
        # epsilon-SupInfoNCE, second pass (every tile checked: not a hot path): each positive over its own
        # denominator e^{l - eps} + e^{LSE_N}: pos_sum = sum_p [l - logaddexp(l - eps, LSE_N)], and
        # R = sum_p sigmoid(LSE_N + eps - l) for the backward.
        pos_sum = tl.zeros([BLOCK_M], ACC)
        r_sum = tl.zeros([BLOCK_M], ACC)
        for start in range(0, M, BLOCK_N):
            cols, col_ok, s, k, valid, a = _row_tile(q, K, KL, MASK, start, rows, row_ok, anchor_label, offs_d, D, M,
                                                     stride_km, stride_kd, stride_mm, self_offset, mask_rows,
                                                     mask_cols, BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC,
                                                     DOT_IN_FP32, OFFSETS_64, VARIANT, True)
            # l - logaddexp(l - eps, LSE_N) = eps - softplus(gap); -inf without negatives: the term is eps
            gap = lse[:, None] + epsilon - s * inv_tau
            pos_sum += tl.sum(tl.where(a > 0, a * (epsilon - _softplus(gap)), 0.0), 1)
            r_sum += tl.sum(tl.where(a > 0, a * tl.sigmoid(gap), 0.0), 1)
        tl.store(POS_AUX + rows, r_sum, mask=row_ok)
        tl.store(POS_SUM + rows, pos_sum, mask=row_ok)
    if VARIANT == 4:
        tl.store(POS_AUX + rows, _log_of_sum(hard_max_c, hard_exp_c, 1.0), mask=row_ok)
        tl.store(POS_AUX + Na + rows, _log_of_sum(hard_max_b, hard_exp_b, 1.0), mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def _tile_grad(s, bias, a, valid, inv_tau, scale2, lse, lse2, pos_scale, den_scale, epsilon, beta, hard_lse_c,
               hard_lse_b, hard_scale_c, hard_scale_b, VARIANT: tl.constexpr, RAW: tl.constexpr,
               CHECKED: tl.constexpr):
    """g_ij / coef_i = u_i exp(l_ij + b_ij - LSE_i) - positive part, on the denominator (0 elsewhere), from the
    raw products s; u_i = 1 except where a row function scales it (epsilon-SupInfoNCE: R_i; debiased:
    dL/dLSE_N); lse2 etc. are the LSEs times log2(e). Positive part in the loop only for L_in,
    a_ij exp(l_ij - LSE_P_i) (LSE_P passed as pos_scale, 0 on rows without positives), and
    epsilon-SupInfoNCE, a_ij sigmoid(LSE_N + eps - l_ij); L_out's and the debiased forms' a_ij pos_scale_i is
    applied per row after the tile loop."""
    if RAW:
        p = tl.math.exp2(s * scale2 - lse2[:, None])
    else:
        l_den = s * inv_tau + bias
        if VARIANT == 4:  # hard negatives: only the (1+beta) and beta log-sum-exps enter the row formula
            p = hard_scale_c[:, None] * tl.math.exp2(l_den * ((1.0 + beta) * LOG2E) - hard_lse_c[:, None]) \
                + hard_scale_b[:, None] * tl.math.exp2(l_den * (beta * LOG2E) - hard_lse_b[:, None])
        else:
            p = tl.math.exp2(l_den * LOG2E - lse2[:, None])
    if CHECKED:
        p = tl.where(valid, p, 0.0)
    if VARIANT == 2 or VARIANT == 3:
        p = p * den_scale[:, None]
    if VARIANT == 1:
        # Off the positives l - LSE_P can pass 88 nats (tau = 0.01, or LSE_P = 0 on a row without positives):
        # exp2 would overflow and inf * 0 give NaN. On a positive l - LSE_P <= -log a_ij, so capping the exponent
        # at 115 bits (exp2 finite in fp32) changes nothing there unless a_ij < 2^-115; a min costs fewer
        # registers than a select.
        p = p - a * tl.math.exp2(tl.minimum(s * scale2 - pos_scale[:, None], 115.0))
    elif VARIANT == 2:
        p = p - tl.where(a > 0, a * tl.sigmoid(lse[:, None] + epsilon - s * inv_tau), 0.0)
    return p


@triton.jit
def _dq_step(dq, gl, g_scale, q, K, KL, MASK, AG, KG, B_SAME, B_OTHER, start, rows, row_ok, anchor_label, offs_d,
             D, M, stride_km, stride_kd, stride_mm, inv_tau, scale2, self_offset, mask_rows, mask_cols, epsilon, beta,
             lse, lse2, pos_scale, den_scale, hard_lse_c, hard_lse_b, hard_scale_c, hard_scale_b,
             TAU_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_SELF: tl.constexpr, USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
             DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr, DEN_BIAS: tl.constexpr,
             RAW: tl.constexpr, CHECKED: tl.constexpr):
    cols, col_ok, s, k, valid, a = _row_tile(q, K, KL, MASK, start, rows, row_ok, anchor_label, offs_d, D, M,
                                             stride_km, stride_kd, stride_mm, self_offset, mask_rows, mask_cols,
                                             BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC, DOT_IN_FP32, OFFSETS_64,
                                             VARIANT, CHECKED)
    bias = _den_bias(rows, cols, row_ok, col_ok, AG, KG, B_SAME, B_OTHER, DEN_BIAS)
    if VARIANT == 2:  # the row shifts carry g_scale into every other term; this one is a plain weight
        a = a * g_scale
    g = _tile_grad(s, bias, a, valid, inv_tau, scale2, lse, lse2, pos_scale, den_scale, epsilon, beta, hard_lse_c,
                   hard_lse_b, hard_scale_c, hard_scale_b, VARIANT, RAW, CHECKED)
    if TAU_GRAD:  # sum_j (g_ij / coef_i) s_ij from the fp32 tile, before g's 16-bit rounding
        gl += tl.sum(g * s, 1)
    return dq + tl.dot(g.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC), gl


@triton.jit
def _supcon_bwd_dq_kernel(
    Q, K, INV_TAU, AL, KL, MASK, AG, KG, B_SAME, B_OTHER, LSE, COEF, POS_SCALE, DEN_SCALE, POS_GRAD, G_LOG2, DQ, GL,
    Na, M, D, self_offset, mask_rows, mask_cols, epsilon, beta,
    stride_qm, stride_qd, stride_km, stride_kd, stride_mm, stride_pgm, stride_dqm,
    N_BUCKET,
    TAU_GRAD: tl.constexpr, HAS_SELF: tl.constexpr, USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr,
    DEN_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ_i = coef_i (sum_j (g_ij / coef_i) k_j - pos_scale_i POS_GRAD_i) / tau: coef is applied to the fp32
    product; POS_GRAD_i = sum_j a_ij k_j (fp32, from the launcher) where the loop has no positives. The tile's
    16-bit operand is g_ij / coef_i times 2^G_LOG2 (about 1/M unscaled: fp16 subnormals at large N), carried in
    the row shifts of its exponentials at no cost per pair, and divided out of the fp32 product. TAU_GRAD:
    also GL_i = sum_j (g_ij / coef_i) l_ij from the fp32 tile (the temperature's gradient)."""
    RAW: tl.constexpr = (VARIANT == 0 or VARIANT == 3) and not DEN_BIAS
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Na
    q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, OFFSETS_64, True)
    inv_tau = tl.load(INV_TAU)
    scale2 = inv_tau * LOG2E
    anchor_label = _anchor_label(AL, rows, row_ok, USE_MASK)
    lse, lse2, coef, pos_scale, den_scale, hard_lse_c, hard_lse_b, hard_scale_c, hard_scale_b = \
        _backward_row_stats(rows, row_ok, Na, LSE, COEF, POS_SCALE, DEN_SCALE, VARIANT)
    g_log2 = tl.load(G_LOG2)
    g_scale = tl.math.exp2(g_log2)
    lse2 = lse2 - g_log2  # e^{l - LSE} 2^G_LOG2
    if VARIANT == 1:
        pos_scale = pos_scale - g_log2  # L_in's positive term, an exponential too
    hard_scale_c = hard_scale_c * g_scale
    hard_scale_b = hard_scale_b * g_scale

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    gl = tl.zeros([BLOCK_M], ACC)
    n_full = M // BLOCK_N
    tile_lo, tile_hi = _self_tiles(first_row + self_offset, n_full, BLOCK_M, BLOCK_N, HAS_SELF)
    for t in range(0, n_full - (tile_hi - tile_lo)):
        dq, gl = _dq_step(dq, gl, g_scale, q, K, KL, MASK, AG, KG, B_SAME, B_OTHER, _plain_tile(t, tile_lo, tile_hi) * BLOCK_N, rows,
                      row_ok, anchor_label, offs_d, D, M, stride_km, stride_kd, stride_mm, inv_tau, scale2,
                      self_offset, mask_rows, mask_cols, epsilon, beta, lse, lse2, pos_scale, den_scale, hard_lse_c,
                      hard_lse_b, hard_scale_c, hard_scale_b, TAU_GRAD, BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC,
                      DOT_IN_FP32, OFFSETS_64, VARIANT, DEN_BIAS, RAW, False)
    for t in range(0, tile_hi - tile_lo + tl.cdiv(M, BLOCK_N) - n_full):
        dq, gl = _dq_step(dq, gl, g_scale, q, K, KL, MASK, AG, KG, B_SAME, B_OTHER, _checked_tile(t, tile_lo, tile_hi, n_full) * BLOCK_N,
                      rows, row_ok, anchor_label, offs_d, D, M, stride_km, stride_kd, stride_mm, inv_tau, scale2,
                      self_offset, mask_rows, mask_cols, epsilon, beta, lse, lse2, pos_scale, den_scale, hard_lse_c,
                      hard_lse_b, hard_scale_c, hard_scale_b, TAU_GRAD, BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC,
                      DOT_IN_FP32, OFFSETS_64, VARIANT, DEN_BIAS, RAW, True)
    d_ok = row_ok[:, None] & (offs_d[None, :] < D)
    dq = dq * (1.0 / g_scale)
    if TAU_GRAD:
        tl.store(GL + rows, gl * (inv_tau / g_scale), mask=row_ok)
    if VARIANT != 1 and VARIANT != 2:  # see _POSITIVES_IN_LOOP
        pos_grad = tl.load(POS_GRAD + _row_offset(rows, stride_pgm, OFFSETS_64)[:, None] + offs_d[None, :],
                           mask=d_ok, other=0.0)
        dq = dq - pos_scale[:, None] * pos_grad
    dq = dq * (coef * inv_tau)[:, None]
    tl.store(DQ + _row_offset(rows, stride_dqm, OFFSETS_64)[:, None] + offs_d[None, :], dq, mask=d_ok)


@triton.jit
def _dk_step(dk, g_scale, k, Q, AL, KL, MASK, AG, KG, B_SAME, B_OTHER, LSE, COEF, POS_SCALE, DEN_SCALE, ROW_SHIFT, start, cols,
             col_ok, safe_cols, offs_d, D, Na, stride_qm, stride_qd, stride_mm, inv_tau, scale2, self_offset,
             mask_rows, mask_cols, epsilon, beta, BLOCK_M: tl.constexpr, HAS_SELF: tl.constexpr,
             USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
             OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr, DEN_BIAS: tl.constexpr, RAW: tl.constexpr,
             CHECKED: tl.constexpr):
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < Na
    q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, OFFSETS_64, CHECKED)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
    if CHECKED:
        valid = _in_denominator(rows, cols, row_ok, col_ok, self_offset, HAS_SELF)
    else:
        valid = rows[:, None] >= 0
    bias = _den_bias(rows, cols, row_ok, col_ok, AG, KG, B_SAME, B_OTHER, DEN_BIAS)
    if VARIANT == 0:
        # L_out: |coef_i| rides in the exponent, g_ij / sign = exp2(l_ij log2(e) - (LSE_i log2(e) - log2|coef_i|)),
        # one shift per row from the launcher (+inf where coef_i = 0); the common sign is applied to dK.
        if CHECKED:
            shift2 = tl.load(ROW_SHIFT + rows, mask=row_ok, other=float("inf"))
        else:  # a full tile: no predicate, so the load can take the accumulator's row layout directly
            shift2 = tl.load(ROW_SHIFT + rows)
        g = _tile_grad(s, bias, 0.0, valid, inv_tau, scale2, shift2, shift2, shift2, shift2, epsilon, beta, shift2,
                       shift2, shift2, shift2, VARIANT, RAW, CHECKED)
    else:
        lse, lse2, coef, pos_scale, den_scale, hard_lse_c, hard_lse_b, hard_scale_c, hard_scale_b = \
            _backward_row_stats(rows, row_ok, Na, LSE, COEF, POS_SCALE, DEN_SCALE, VARIANT)
        if VARIANT == 1 or VARIANT == 2:  # see _POSITIVES_IN_LOOP
            anchor_label = _anchor_label(AL, rows, row_ok, USE_MASK)
            a = _positive_weights(rows, safe_cols, row_ok, valid, anchor_label, KL, MASK, mask_rows, mask_cols,
                                  stride_mm, USE_MASK, ACC, OFFSETS_64)
        else:
            a = 0.0
        g = (coef * g_scale)[:, None] * _tile_grad(s, bias, a, valid, inv_tau, scale2, lse, lse2, pos_scale, den_scale, epsilon,
                                       beta, hard_lse_c, hard_lse_b, hard_scale_c, hard_scale_b, VARIANT, RAW,
                                       CHECKED)
    return dk + tl.dot(tl.trans(g).to(q.dtype), q, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _supcon_bwd_dk_kernel(
    Q, K, INV_TAU, AL, KL, MASK, AG, KG, B_SAME, B_OTHER, LSE, COEF, POS_SCALE, DEN_SCALE, ROW_SHIFT, COEF_SIGN,
    POS_GRAD, G_LOG2, DK,
    Na, M, D, self_offset, mask_rows, mask_cols, epsilon, beta,
    stride_qm, stride_qd, stride_km, stride_kd, stride_mm, stride_pgm, stride_dkm,
    N_BUCKET,
    HAS_SELF: tl.constexpr, USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr,
    DEN_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK_j = (sum_i g_ij q_i - POS_GRAD_j) / tau; POS_GRAD_j = sum_i coef_i pos_scale_i a_ij q_i (fp32, from
    the launcher) where the loop has no positives. L_out reads ROW_SHIFT (LSE_i log2(e) - log2|coef_i|) and
    COEF_SIGN (the sign all coef_i share) instead of LSE and COEF. The tile's 16-bit operand is g times 2^G_LOG2
    (g ~ 1/(Na M) is below fp16's subnormals at large N; L_out's ROW_SHIFT already holds G_LOG2), divided out of
    the fp32 product."""
    RAW: tl.constexpr = (VARIANT == 0 or VARIANT == 3) and not DEN_BIAS
    first_col = tl.program_id(0) * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < M
    k = _load_rows(K, cols, col_ok, offs_d, D, stride_km, stride_kd, DOT_IN_FP32, OFFSETS_64, True)
    inv_tau = tl.load(INV_TAU)
    scale2 = inv_tau * LOG2E
    g_scale = tl.math.exp2(tl.load(G_LOG2))
    safe_cols = tl.where(col_ok, cols, -1)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    n_full = Na // BLOCK_M
    # anchor i's self is key i + self_offset: the anchors whose self is in this block start at first - offset
    tile_lo, tile_hi = _self_tiles(first_col - self_offset, n_full, BLOCK_N, BLOCK_M, HAS_SELF)
    for t in range(0, n_full - (tile_hi - tile_lo)):
        dk = _dk_step(dk, g_scale, k, Q, AL, KL, MASK, AG, KG, B_SAME, B_OTHER, LSE, COEF, POS_SCALE, DEN_SCALE, ROW_SHIFT,
                      _plain_tile(t, tile_lo, tile_hi) * BLOCK_M, cols, col_ok, safe_cols, offs_d, D, Na, stride_qm,
                      stride_qd, stride_mm, inv_tau, scale2, self_offset, mask_rows, mask_cols, epsilon, beta,
                      BLOCK_M, HAS_SELF, USE_MASK, PRECISION, ACC, DOT_IN_FP32, OFFSETS_64, VARIANT, DEN_BIAS, RAW,
                      False)
    for t in range(0, tile_hi - tile_lo + tl.cdiv(Na, BLOCK_M) - n_full):
        dk = _dk_step(dk, g_scale, k, Q, AL, KL, MASK, AG, KG, B_SAME, B_OTHER, LSE, COEF, POS_SCALE, DEN_SCALE, ROW_SHIFT,
                      _checked_tile(t, tile_lo, tile_hi, n_full) * BLOCK_M, cols, col_ok, safe_cols, offs_d, D, Na,
                      stride_qm, stride_qd, stride_mm, inv_tau, scale2, self_offset, mask_rows, mask_cols, epsilon,
                      beta, BLOCK_M, HAS_SELF, USE_MASK, PRECISION, ACC, DOT_IN_FP32, OFFSETS_64, VARIANT, DEN_BIAS,
                      RAW, True)
    d_ok = col_ok[:, None] & (offs_d[None, :] < D)
    dk = dk * (1.0 / g_scale)
    if VARIANT == 0:
        dk = dk * tl.load(COEF_SIGN)
    if VARIANT != 1 and VARIANT != 2:  # see _POSITIVES_IN_LOOP
        dk = dk - tl.load(POS_GRAD + _row_offset(cols, stride_pgm, OFFSETS_64)[:, None] + offs_d[None, :],
                          mask=d_ok, other=0.0)
    dk = dk * inv_tau
    tl.store(DK + _row_offset(cols, stride_dkm, OFFSETS_64)[:, None] + offs_d[None, :], dk, mask=d_ok)


# ----------------------------------------------------------------------------- launchers

MAX_D = 512  # whole-D tiles: dq/dk accumulators of [BLOCK, D] fp32 must fit in registers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel family, input width and BLOCK_D: the configs
# the autotuner may try. Each compiles for sm_80 and sm_90 without register spills
# (tests/test_aot_compile.py): the backward kernels hold a [BLOCK, BLOCK_D] fp32 accumulator, so
# their tiles shrink sooner; fp32 inputs (tf32x3 on tensor cores) only fit whole rows up to D = 64.
TILE_CONFIGS = {
    ("fwd", 2): {64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
                 128: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
                 256: [(64, 64, 8, 3), (64, 32, 4, 3)],
                 512: [(64, 32, 8, 2), (32, 32, 4, 2)]},
    ("bwd", 2): {64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
                 128: [(128, 64, 8, 3), (64, 32, 4, 4)],
                 256: [(64, 32, 8, 3), (16, 32, 4, 2)],
                 512: [(32, 32, 8, 2), (16, 32, 8, 2)]},
    ("fwd", 4): {64: [(32, 32, 4, 2)]},
    ("bwd", 4): {64: [(16, 32, 4, 2)]},  # 32 rows: dQ spills 8-16 bytes (POS_GRAD in the epilogue)
}
# Before Hopper, mma.sync keeps more of the tile in registers: the 128-row backward tile spills there at
# D = 128, dK's 64 x 64 tile at D = 64 (8 bytes, Triton 3.9) and dQ's 16-row tile at D = 256 (24 bytes,
# Triton 3.6.0).
PRE_HOPPER_DROP = {("bwd", 2): {64: [(64, 64, 4, 3)], 128: [(128, 64, 8, 3)], 256: [(16, 32, 4, 2)]}}
# The bias tile (two table lookups per key) costs the 128-row backward tile its last registers; the row
# formulas' extra per-row scale (epsilon-SupInfoNCE, debiased) costs the 32-row one at D = 512 on sm_90.
DEN_BIAS_DROP = {("bwd", 2): {128: [(128, 64, 8, 3)]}}
ROW_SCALE_DROP = {("bwd", 2): {128: [(128, 64, 8, 3)], 512: [(32, 32, 8, 2)]}}
# The row formulas' extra row scales (and hard negatives' two more LSEs) spill the last backward tile left in
# two buckets (8 bytes in dQ at D = 512: debiased on sm_90, epsilon-SupInfoNCE in fp16 on sm_80 with Triton
# 3.6.0; 16 in dK at D = 128 on sm_80 with hard negatives): the same tile with one stage fewer, or with twice
# the warps, compiles clean (ptxas, Triton 3.6.0 and 3.9).
ROW_FORMULA_SWAP = {("bwd", 2): {128: {(64, 32, 4, 4): (64, 32, 8, 3)}, 512: {(16, 32, 8, 2): (16, 32, 8, 1)}}}
INTERPRETER = (32, 32, 4, 2)  # the interpreter runs one op per tile in numpy: few, mid-sized tiles
FP32_MAX_D = 64


def _config(shape):
    m, n, w, st = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)


# dK alone (family "bwd_dk"): a block of 128 key columns halves the per-pair share of loading each anchor tile
# and building its wgmma descriptors (5.6 lane-instructions per pair against 8.6 for 128 x 64, sm_90, bf16,
# D = 128). Its 128 x 128 fp32 logits and accumulator take all 255 registers: on sm_90 only, and only for the
# plain denominator (L_out, no bias table), where the tile loop holds nothing else.
DK_WIDE = {("bwd", 2): {128: [(128, 128, 8, 2)]}}


def tile_shapes(family: str, elem_bytes: int, block_d: int, arch: int, n: int, den_bias: bool = False,
                variant: int = 0):
    """The (BLOCK_M, BLOCK_N, warps, stages) the autotuner may try for one launch (family: fwd, bwd for dQ,
    bwd_dk for dK)."""
    bucket = max(64, block_d)
    wide = family == "bwd_dk" and arch >= 90 and variant == 0 and not den_bias
    family = "bwd" if family == "bwd_dk" else family
    shapes = (DK_WIDE.get((family, elem_bytes), {}).get(bucket, []) if wide else []) \
        + TILE_CONFIGS[(family, elem_bytes)][bucket]
    for drop, applies in ((PRE_HOPPER_DROP, arch < 90), (DEN_BIAS_DROP, den_bias), (ROW_SCALE_DROP, variant >= 2)):
        if applies:
            dropped = drop.get((family, elem_bytes), {}).get(bucket, [])
            shapes = [sh for sh in shapes if sh not in dropped]
    if variant >= 2:
        swap = ROW_FORMULA_SWAP.get((family, elem_bytes), {}).get(bucket, {})
        shapes = [swap.get(sh, sh) for sh in shapes]
    if n <= 64:  # one tile does it all: the smallest shape left, no tuning
        return shapes[-1:]
    return shapes


def _pruner(family: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # launchers pass everything by keyword
        if _interpreting():  # one config: launched directly, never benchmarked
            return [_config(INTERPRETER)]
        q = args["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        shapes = tile_shapes(family, q.element_size(), args["BLOCK_D"], 10 * major + minor, max(args["Na"], args["M"]),
                             args["DEN_BIAS"], args["VARIANT"])
        return [_config(sh) for sh in shapes]
    return prune


TUNING_KEY = ["D", "N_BUCKET", "HAS_SELF", "USE_MASK", "PRECISION", "DEN_BIAS", "VARIANT"]


def _autotune_options() -> dict:
    """Keep the tuning results on disk (under TRITON_CACHE_DIR) so that a new process does not benchmark the
    same key again; every triton this package supports (>= 3.6) takes ``cache_results``."""
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the inputs' device for the launch."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TunedKernel:
    """``kernel[grid](**args)`` with the autotuner's configs pruned by ``_pruner``, under the inputs' device.
    When one config survives the pruning it is launched directly: triton 3.6 would still benchmark it
    (about 100 ms of repeated launches per new key), and there is nothing to choose."""

    def __init__(self, kernel, family: str):
        self.kernel, self.family = kernel, family
        tables = [*TILE_CONFIGS.items(), *(DK_WIDE.items() if family == "bwd_dk" else ())]
        base = "bwd" if family == "bwd_dk" else family
        shapes = sorted({sh for (fam, _), table in tables if fam == base for t in table.values() for sh in t})
        self.configs = [_config(sh) for sh in shapes]
        self.tuner = triton.autotune(configs=self.configs, key=TUNING_KEY,
                                     prune_configs_by={"early_config_prune": _pruner(family)},
                                     **_autotune_options())(kernel)

    def __getitem__(self, grid):
        def launch(**args):
            with _device_guard(args["K"].device):
                configs = _pruner(self.family)(self.configs, {}, **args)
                if len(configs) == 1:
                    return self.kernel[grid](**args, **configs[0].all_kwargs())
                return self.tuner[grid](**args)
        return launch


supcon_fwd = TunedKernel(_supcon_fwd_kernel, "fwd")
supcon_bwd_dq = TunedKernel(_supcon_bwd_dq_kernel, "bwd")
supcon_bwd_dk = TunedKernel(_supcon_bwd_dk_kernel, "bwd_dk")


# The row formula per spec.variant: 0 L_out, 1 L_in, 2 epsilon-SupInfoNCE (second pass over the positives),
# 3 debiased (L_out's statistics; the row function's derivatives scale the backward's two terms).
VARIANTS = {"out": 0, "in": 1, "eps": 2, "debiased": 3, "debiased_hard": 4}


def variant_code(spec) -> int:
    """Variant 4: debiased with hard-negative reweighting (two more online LSEs, of (1+beta) l and beta l)."""
    return VARIANTS["debiased_hard" if spec.variant == "debiased" and spec.beta != 0 else spec.variant]


def rows_why_not(dtype: torch.dtype, device: torch.device, dim: int, fp16_reason: str | None = None) -> str | None:
    """What every Triton kernel file asks of its feature rows (None: they can be run): a CUDA device (or the
    interpreter), D <= MAX_D, tensor-core dtypes, fp32 only up to FP32_MAX_D; ``fp16_reason``: why a kernel
    refuses fp16 (None: it takes it)."""
    if device.type != "cuda" and not _interpreting():
        return f"inputs are on {device.type}; Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
    if dim > MAX_D:
        return f"feature dimension {dim} > {MAX_D}: the kernels keep whole rows in registers"
    if dtype == torch.float16 and fp16_reason is not None:
        return fp16_reason
    if _interpreting():
        return None
    if dtype == torch.float64:
        return "float64 inputs: the kernels use tensor cores (fp32/fp16/bf16); use chunked or reference"
    if dtype == torch.float32 and dim > FP32_MAX_D:
        return (f"float32 inputs with D = {dim} > {FP32_MAX_D}: whole fp32 rows would spill registers; "
                "pass bf16/fp16 features, or use chunked (cuBLAS) for fp32")
    return None


def why_not(spec) -> str | None:
    """Why these kernels cannot run the spec (None: they can)."""
    if getattr(spec, "soft_target", None) is not None:  # SCE / CoMatch: their own kernels
        from fused_contrastive.triton_kernels import soft

        return soft.why_not(spec)
    if spec.device.type != "cuda" and not _interpreting():
        return f"inputs are on {spec.device.type}; Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
    if spec.variant not in VARIANTS:
        return f"no kernel for the row formula {spec.variant!r}"
    return rows_why_not(spec.keys.dtype, spec.device, spec.keys.shape[1])


# fp32 inputs: "tf32x3" (three tf32 products, fp32-accurate, on tensor cores) unless the user opts
# into plain tf32 the way PyTorch users do: torch.backends.cuda.matmul.allow_tf32 = True.
FP32_PRECISION = "tf32x3"


def _precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32 or _interpreting():
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else FP32_PRECISION


INT32_LIMIT = 2**31


def offsets_64(Q, K, mask) -> bool:
    """Whether some element offset the kernels form (row index times row stride, plus the column) can pass
    int32: in Q, K, dQ, dK, or in the dense mask, whose [B, B] can be the largest of them (B >= 46341)."""
    dim = K.shape[1]
    span = max(Q.shape[0], K.shape[0]) * max(Q.stride(0), K.stride(0), dim)
    if mask is not None:
        span = max(span, mask.shape[0] * max(mask.stride(0), mask.shape[1]))
    return span >= INT32_LIMIT


def _common_args(spec, Q, K, inv_tau):
    mask = spec.mask
    # The kernels index the mask's columns with stride 1 (losses.py makes it contiguous).
    assert mask is None or mask.shape[1] <= 1 or mask.stride(1) == 1, f"mask column stride {mask.stride(1)} != 1"
    dummy = torch.zeros(1, dtype=torch.int32, device=K.device)
    al = spec.anchor_labels if mask is None else dummy
    kl = spec.key_labels if mask is None else dummy
    mask_t = mask if mask is not None else dummy
    bias = spec.den_bias
    dummy_acc = torch.zeros(1, dtype=spec.accum_dtype, device=K.device)
    mask_rows, mask_cols = (mask.shape if mask is not None else (1, 1))
    dim = K.shape[1]
    return dict(
        Q=Q, K=K, INV_TAU=inv_tau, AL=al, KL=kl, MASK=mask_t,
        AG=bias.anchor_groups if bias is not None else dummy, KG=bias.key_groups if bias is not None else dummy,
        B_SAME=bias.same if bias is not None else dummy_acc, B_OTHER=bias.other if bias is not None else dummy_acc,
        Na=Q.shape[0], M=K.shape[0], D=dim,
        self_offset=spec.self_offset if spec.self_offset is not None else 0,
        mask_rows=mask_rows, mask_cols=mask_cols,
        stride_qm=Q.stride(0), stride_qd=Q.stride(1), stride_km=K.stride(0), stride_kd=K.stride(1),
        stride_mm=mask_t.stride(0) if mask is not None else 0,
        N_BUCKET=triton.next_power_of_2(max(Q.shape[0], K.shape[0])),
        HAS_SELF=spec.self_offset is not None, USE_MASK=mask is not None, PRECISION=_precision(K.dtype),
        ACC=tl.float64 if K.dtype == torch.float64 else tl.float32,
        DOT_IN_FP32=_interpreting() and K.dtype == torch.bfloat16,
        OFFSETS_64=offsets_64(Q, K, mask),
        epsilon=float(spec.epsilon), beta=float(spec.beta), VARIANT=variant_code(spec), DEN_BIAS=bias is not None,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )


def _normalized(spec, Q, K):
    """The rows the kernels take: L2-normalised once here (in the accumulation dtype, stored in the input
    dtype) when the spec asks for it, rather than on every tile load; fused.py chains the gradient
    through x / |x|."""
    if not spec.normalize:
        return Q, K
    Kn = normalize_rows(K, spec.accum_dtype).to(K.dtype)
    return (Kn if Q is K else normalize_rows(Q, spec.accum_dtype).to(Q.dtype)), Kn


def _self_positive(spec):
    """(index of each anchor's self key, clamped to 0; a_{i, self}: its weight had it not been excluded)."""
    acc = spec.accum_dtype
    self_cols = spec.self_columns()
    has_self = self_cols >= 0
    safe = self_cols.clamp(min=0)
    if spec.mask is None:
        weight = (has_self & (spec.key_labels[safe] == spec.anchor_labels)).to(acc)
    else:
        rows_b, cols_b = spec.mask.shape
        rows = torch.arange(spec.num_anchors, device=spec.device) % rows_b
        weight = torch.where(has_self, spec.mask[rows, safe % cols_b].to(acc), 0.0)
    return safe, weight


def anchor_positive_sums(spec, K):
    """P_i = sum_j a_ij K_j over anchor i's positives (self excluded), [Na, D] in the accumulation dtype, from
    per-class sums of keys (labels) or per-mask-column sums times the [B, B] mask: O((Na + M) D + B^2 D)."""
    acc = spec.accum_dtype
    keys = K.to(acc)
    if spec.mask is None:
        sums = torch.zeros((spec.num_classes, K.shape[1]), dtype=acc, device=K.device)
        sums.index_add_(0, spec.key_labels, keys)
        total = sums[spec.anchor_labels]
    else:
        rows_b, cols_b = spec.mask.shape
        sums = torch.zeros((cols_b, K.shape[1]), dtype=acc, device=K.device)
        sums.index_add_(0, torch.arange(K.shape[0], device=K.device) % cols_b, keys)
        total = (spec.mask.to(acc) @ sums)[torch.arange(spec.num_anchors, device=K.device) % rows_b]
    safe, self_weight = _self_positive(spec)
    return (total - self_weight[:, None] * keys[safe]).contiguous()


def key_positive_sums(spec, W):
    """T_j = sum_i a_ij W_i over the anchors that have key j among their positives (self excluded),
    [M, D] in the accumulation dtype; W [Na, D]."""
    acc = spec.accum_dtype
    num_keys, dim = spec.num_keys, W.shape[1]
    if spec.mask is None:
        sums = torch.zeros((spec.num_classes, dim), dtype=acc, device=W.device)
        sums.index_add_(0, spec.anchor_labels, W)
        total = sums[spec.key_labels]
    else:
        rows_b, cols_b = spec.mask.shape
        sums = torch.zeros((rows_b, dim), dtype=acc, device=W.device)
        sums.index_add_(0, torch.arange(W.shape[0], device=W.device) % rows_b, W)
        total = (spec.mask.to(acc).T @ sums)[torch.arange(num_keys, device=W.device) % cols_b]
    safe, self_weight = _self_positive(spec)
    return total.index_add_(0, safe, -self_weight[:, None] * W).contiguous()


def forward_stats(spec, Q, K, inv_tau):
    """(lse, pos_sum, pos_aux) per anchor in the accumulation dtype; pos_aux: R_i for epsilon-SupInfoNCE,
    [2, Na] LSEs of (1+beta) l and beta l for hard negatives."""
    Q, K = _normalized(spec, Q, K)
    args = _common_args(spec, Q, K, inv_tau)
    lse = torch.empty(Q.shape[0], dtype=spec.accum_dtype, device=K.device)
    pos_sum = torch.empty_like(lse)
    code = variant_code(spec)
    pos_aux = lse
    if code in (2, 4):
        pos_aux = torch.empty((2 if code == 4 else 1, Q.shape[0]), dtype=lse.dtype, device=K.device)
    grid = lambda meta: (triton.cdiv(Q.shape[0], meta["BLOCK_M"]),)  # noqa: E731
    supcon_fwd[grid](LSE=lse, POS_SUM=pos_sum, POS_AUX=pos_aux, **args)
    if code not in _POSITIVES_IN_LOOP:  # sum_j a_ij l_ij = q_i . P_i / tau
        pos_sum = (Q.to(lse.dtype) * anchor_positive_sums(spec, K)).sum(1) * inv_tau
    return lse, pos_sum, pos_aux[0] if code == 2 else pos_aux


def _coef_in_exponent(rows, dk_log2):
    """(LSE_i log2(e) - log2|coef_i| - dk_log2, +inf where coef_i = 0 or the row has no key; the sign every
    coef_i shares, [1]) for L_out's dK, whose tile then needs no multiply by coef. coef_i = c times the row's
    gradient (the reduction's w_i / divisor times one upstream scalar), so the signs agree unless
    ``rows.mixed_signs`` (reduction="none": the backward splits them); checked on the device without a host sync."""
    coef, lse = rows.coef, rows.lse
    negative = (coef < 0).any()
    torch._assert_async(~(negative & (coef > 0).any()), "coef_i of mixed signs")
    keep = (coef != 0) & (lse > float("-inf"))
    shift = lse * LOG2E.value - torch.log2(torch.where(keep, coef.abs(), 1.0)) - dk_log2
    return torch.where(keep, shift, float("inf")), torch.where(negative, -1.0, 1.0).to(coef.dtype).reshape(1)


def grad_scales(spec, rows, dtype: torch.dtype):
    """log2 of the powers of two that multiply the 16-bit operands of the dQ and dK products (one-element
    tensors, computed on the device: no host sync). Only fp16 needs them: bf16 and fp32 have fp32's exponent
    range, while in fp16 the dK tile g_ij ~ coef_i / M ~ 1 / (Na M) and dQ's g_ij / coef_i ~ 1 / M fall below
    its subnormals from N of a few thousand. Each is the largest power of two keeping a bound of the operand at
    or below 2^15 (the largest power of two under fp16's maximum), so neither the operand nor the fp32
    accumulator (a row's softmax weights sum to 1) can overflow. Bound of |g_ij / coef_i| in the tile loop:
    the denominator part (|exp(l + b - LSE)| <= 1 times its row scale) plus the positives read in the loop
    (L_in: a_ij exp(l - LSE_P) <= 1; epsilon-SupInfoNCE: a_ij sigmoid(.) <= a_ij); dK's adds |coef_i|."""
    acc = rows.coef.dtype
    zero = torch.zeros(1, dtype=acc, device=rows.coef.device)
    if dtype != torch.float16:
        return zero, zero
    code = variant_code(spec)
    if code in (0, 1):
        den = torch.ones_like(rows.coef)
    elif code in (2, 3):
        den = rows.den_scale.abs()
    else:  # hard negatives: the (1+beta) and beta terms' scales
        den = rows.den_scale[1].abs() + rows.den_scale[2].abs()
    mask = spec.mask
    a_max = 1.0 if mask is None or mask.dtype == torch.uint8 else mask.amax().to(acc)
    h = den + (1.0 if code == 1 else a_max if code == 2 else 0.0)
    top = math.floor(math.log2(torch.finfo(dtype).max))

    def log2_scale(bound):  # |exponent| <= 64 keeps 2^e and 2^-e normal in fp32; a zero bound takes 64
        return torch.floor(top - torch.log2(bound.amax().to(acc))).clamp(-64.0, 64.0).reshape(1)

    return log2_scale(h), log2_scale(rows.coef.abs() * h)


def backward_grads(spec, Q, K, inv_tau, rows, need_dq=True, need_dk=True, logit_sums=False):
    """dQ and dK (input dtype) for the per-row backward factors ``rows`` (RowFactors), recomputing every
    tile from lse; with respect to the normalised rows when the spec normalises. ``logit_sums``: also
    sum_j g_ij l_ij per anchor (accumulation dtype), from the dQ pass (the temperature's gradient)."""
    Q, K = _normalized(spec, Q, K)
    args = _common_args(spec, Q, K, inv_tau)
    factors = dict(LSE=rows.lse, COEF=rows.coef, POS_SCALE=rows.pos_scale, DEN_SCALE=rows.den_scale)
    outside = variant_code(spec) not in _POSITIVES_IN_LOOP
    dummy = torch.zeros(1, dtype=spec.accum_dtype, device=K.device)
    dq_log2, dk_log2 = grad_scales(spec, rows, K.dtype)
    dq = dk = sums = None
    if need_dq or logit_sums:
        # Stored in the input dtype (accumulated in fp32 registers): at N = 1M, D = 128 fp32 copies
        # of dQ and dK alone would take 1 GB.
        dq = torch.empty(Q.shape, dtype=Q.dtype, device=K.device)
        pos_grad = anchor_positive_sums(spec, K) if outside else dummy
        sums = torch.empty(Q.shape[0] if logit_sums else 1, dtype=spec.accum_dtype, device=K.device)
        grid = lambda meta: (triton.cdiv(Q.shape[0], meta["BLOCK_M"]),)  # noqa: E731
        supcon_bwd_dq[grid](DQ=dq, stride_dqm=dq.stride(0), POS_GRAD=pos_grad, stride_pgm=pos_grad.stride(0),
                            G_LOG2=dq_log2, GL=sums, TAU_GRAD=bool(logit_sums), **factors, **args)
        if logit_sums:  # the loop saw g / coef without the positives that ride outside it: add them here
            if outside:
                sums = sums - rows.pos_scale * (Q.to(pos_grad.dtype) * pos_grad).sum(1) * inv_tau
            sums = sums * rows.coef
    if need_dk:
        def launch_dk(part):
            dk = torch.empty(K.shape, dtype=K.dtype, device=K.device)
            if outside:  # sum_i coef_i pos_scale_i a_ij q_i
                pos_grad = key_positive_sums(spec, Q.to(dummy.dtype) * (part.coef * part.pos_scale)[:, None])
            else:
                pos_grad = dummy
            row_shift, coef_sign = _coef_in_exponent(part, dk_log2) if variant_code(spec) == 0 else (dummy, dummy)
            grid = lambda meta: (triton.cdiv(K.shape[0], meta["BLOCK_N"]),)  # noqa: E731
            supcon_bwd_dk[grid](DK=dk, stride_dkm=dk.stride(0), POS_GRAD=pos_grad, stride_pgm=pos_grad.stride(0),
                                ROW_SHIFT=row_shift, COEF_SIGN=coef_sign, G_LOG2=dk_log2,
                                **{**factors, "COEF": part.coef}, **args)
            return dk

        if variant_code(spec) == 0 and rows.mixed_signs:
            # L_out's dK carries |coef_i| in the exponent with one sign for all rows: per-row gradients of
            # either sign (reduction="none") take one launch for the positive coefs and one for the negative.
            parts = [fused.RowFactors(rows.lse, rows.coef.clamp(**bound), rows.pos_scale, rows.den_scale)
                     for bound in ({"min": 0.0}, {"max": 0.0})]
            dk = (launch_dk(parts[0]).to(spec.accum_dtype) + launch_dk(parts[1])).to(K.dtype)
        else:
            dk = launch_dk(rows)
    dq = dq if need_dq else None
    return (dq, dk, sums) if logit_sums else (dq, dk)


# ----------------------------------------------------------------------------- autograd and API (shared)

KERNELS = fused.Kernels("triton", forward_stats, backward_grads, logit_sums=True)


def loss(spec):
    if spec.soft_target is not None:
        from fused_contrastive.triton_kernels import soft

        return soft.loss(spec)
    return fused.loss(spec, KERNELS)


def loss_and_grads(spec):
    if spec.soft_target is not None:  # (as chunked: the soft-target losses refuse torch.compile before this)
        raise ValueError("soft per-pair targets (SCE, CoMatch) do not run under torch.compile in this version")
    return fused.loss_and_grads(spec, KERNELS)


def row_stats(spec):
    return fused.row_stats(spec, KERNELS)


def grads_from_stats(spec, lse, coef, pos_scale, den_scale):
    return fused.grads_from_stats(spec, lse, coef, pos_scale, den_scale, KERNELS)
