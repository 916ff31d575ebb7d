"""SupCon / SimCLR (DESIGN.md's general loss with a_ij in {labels, dense mask}) as fused Triton kernels.

Read top to bottom: the three kernels (forward; dQ row-parallel; dK column-parallel),
their launchers (grid, autotuning, argument plumbing), and the ``loss(spec)`` entries that
fused_contrastive's dispatcher calls (the autograd.Function above the launchers is shared with
the CUDA backend: ``fused_contrastive.fused``).

Every tile of logits ``l = Q_blk K_blk^T / tau`` lives in registers only. The forward
keeps per row a running max ``m``, running ``sum exp(l - m)`` and ``pos_sum = sum a*l``
and saves ``lse`` (fp32). The backward recomputes each tile from ``lse``:
``g = coef_i * (exp(l - lse_i) - a_ij / Z_i)`` (``coef_i`` carries dLoss/dL_i and the
scale c), then ``dQ = g K / tau`` in one kernel and ``dK = g^T Q / tau`` in another:
no atomics, so results are bit-deterministic. Positives come from label vectors or
from the user's ``[B, B]`` mask (bytes for a 0/1 mask, fp32 weights otherwise), read
tile by tile; nothing of size Na x M is ever written.
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

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_offset(idx, stride, OFFSETS_64: tl.constexpr):
    """idx * stride, in int64 when the launcher saw that N * stride can pass 2**31 (an int32 overflow would
    read wrong rows); int32 otherwise, which saves the registers of 64-bit address arithmetic."""
    if OFFSETS_64:
        return idx.to(tl.int64) * stride
    return idx * stride


@triton.jit
def _load_rows(X, idx, ok, offs_d, D, stride_m, stride_d, DOT_IN_FP32: tl.constexpr, NORMALIZE: tl.constexpr,
               ACC: tl.constexpr, OFFSETS_64: tl.constexpr):
    """Rows X[idx] as a [len(idx), BLOCK_D] tile, zero outside the rows and past D (padding without a copy),
    L2-normalised in registers when NORMALIZE (x / max(|x|, 1e-12), as F.normalize)."""
    x = tl.load(X + _row_offset(idx, stride_m, OFFSETS_64)[:, None] + offs_d[None, :] * stride_d,
                mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if NORMALIZE:
        xf = x.to(ACC)
        inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(xf * xf, 1)), 1e-12)
        x = (xf * inv_norm[:, None]).to(x.dtype)
    if DOT_IN_FP32:  # Triton's interpreter multiplies bf16 bit patterns in tl.dot; only it sets this
        x = x.to(tl.float32)
    return x


@triton.jit
def _tile_logits(q, K, cols, offs_d, D, stride_km, stride_kd, inv_tau, col_ok, PRECISION: tl.constexpr,
                 ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr, NORMALIZE: tl.constexpr,
                 OFFSETS_64: tl.constexpr):
    """l = q K[cols]^T / tau in the accumulation dtype, and the key tile."""
    k = _load_rows(K, cols, col_ok, offs_d, D, stride_km, stride_kd, DOT_IN_FP32, NORMALIZE, ACC, OFFSETS_64)
    l = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
    return l, k


@triton.jit
def _positive_weights(rows, cols, row_ok, valid, anchor_label, KL, MASK, mask_rows, mask_cols, stride_mm,
                      USE_MASK: tl.constexpr, ACC: tl.constexpr, OFFSETS_64: tl.constexpr):
    """a_ij for one tile (0 outside the denominator), from labels or the [B, B] mask (column stride 1)."""
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
    """The saved per-anchor statistics the backward tile needs: LSE, LSE with 0 for a row without keys, coef,
    the positive scale and (row functions only) the denominator scales: u_i for e^{l + b - LSE}, and with
    hard negatives (variant 4) also those of the (1+beta) and beta log-sum-exps, whose LSEs follow LSE
    ([3, Na] buffers)."""
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
    pos_scale = tl.load(POS_SCALE + rows, mask=row_ok, other=0.0)
    den_scale = coef
    hard_lse_c = lse_safe
    hard_lse_b = lse_safe
    hard_scale_c = coef
    hard_scale_b = coef
    if VARIANT >= 2:
        den_scale = tl.load(DEN_SCALE + rows, mask=row_ok, other=0.0)
    if VARIANT == 4:
        hard_lse_c = tl.load(LSE + Na + rows, mask=row_ok, other=0.0)
        hard_lse_b = tl.load(LSE + 2 * Na + rows, mask=row_ok, other=0.0)
        hard_lse_c = tl.where(hard_lse_c == float("-inf"), 0.0, hard_lse_c)
        hard_lse_b = tl.where(hard_lse_b == float("-inf"), 0.0, hard_lse_b)
        hard_scale_c = tl.load(DEN_SCALE + Na + rows, mask=row_ok, other=0.0)
        hard_scale_b = tl.load(DEN_SCALE + 2 * Na + rows, mask=row_ok, other=0.0)
    return lse, lse_safe, coef, pos_scale, den_scale, hard_lse_c, hard_lse_b, hard_scale_c, hard_scale_b


@triton.jit
def _online_lse(m, total, x):
    """One tile's update of a running (max, sum of exp(x - max)) per row; x may hold -inf (a row with no
    finite entry yet keeps a 0 shift, so exp() stays finite)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, total * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)


@triton.jit
def _softplus(x):
    """log(1 + e^x) without overflow, and 0 at x = -inf."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _row_tile(q, K, KL, MASK, start, rows, row_ok, anchor_label, offs_d, D, M, stride_km, stride_kd, stride_mm,
              inv_tau, self_offset, mask_rows, mask_cols, BLOCK_N: tl.constexpr, HAS_SELF: tl.constexpr,
              USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
              NORMALIZE: tl.constexpr, OFFSETS_64: tl.constexpr):
    """For a row-parallel program, the key tile at ``start``: its columns, logits, keys, denominator
    predicate (in range, not self) and positive weights."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    l, k = _tile_logits(q, K, cols, offs_d, D, stride_km, stride_kd, inv_tau, col_ok,
                        PRECISION, ACC, DOT_IN_FP32, NORMALIZE, OFFSETS_64)
    valid = _in_denominator(rows, cols, row_ok, col_ok, self_offset, HAS_SELF)
    a = _positive_weights(rows, tl.where(col_ok, cols, -1), row_ok, valid, anchor_label, KL, MASK,
                          mask_rows, mask_cols, stride_mm, USE_MASK, ACC, OFFSETS_64)
    return cols, col_ok, l, k, valid, a


@triton.jit
def _supcon_fwd_kernel(
    Q, K, INV_TAU, AL, KL, MASK, AG, KG, B_SAME, B_OTHER, LSE, POS_SUM, POS_AUX,
    Na, M, D, self_offset, mask_rows, mask_cols, epsilon, beta,
    stride_qm, stride_qd, stride_km, stride_kd, stride_mm,
    N_BUCKET,  # autotuning key only
    HAS_SELF: tl.constexpr, USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, NORMALIZE: tl.constexpr, OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr,
    DEN_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Na
    q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, NORMALIZE, ACC, OFFSETS_64)
    inv_tau = tl.load(INV_TAU)
    anchor_label = _anchor_label(AL, rows, row_ok, USE_MASK)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    sum_exp = tl.zeros([BLOCK_M], ACC)
    pos_sum = tl.zeros([BLOCK_M], ACC)  # L_out: sum_j a_ij l_ij
    pos_max = tl.full([BLOCK_M], float("-inf"), ACC)  # L_in: online log sum_j a_ij exp(l_ij)
    pos_exp = tl.zeros([BLOCK_M], ACC)
    hard_max_c = tl.full([BLOCK_M], float("-inf"), ACC)  # variant 4: online LSE of (1+beta) l and of beta l
    hard_exp_c = tl.zeros([BLOCK_M], ACC)
    hard_max_b = tl.full([BLOCK_M], float("-inf"), ACC)
    hard_exp_b = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols, col_ok, l, k, valid, a = _row_tile(q, K, KL, MASK, start, rows, row_ok, anchor_label, offs_d, D, M,
                                                 stride_km, stride_kd, stride_mm, inv_tau, self_offset, mask_rows,
                                                 mask_cols, BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC, DOT_IN_FP32,
                                                 NORMALIZE, OFFSETS_64)
        if VARIANT == 1:  # L_in
            lp = tl.where(a > 0, l, float("-inf"))
            pos_max_new = tl.maximum(pos_max, tl.max(lp, 1))
            pos_safe = tl.where(pos_max_new == float("-inf"), 0.0, pos_max_new)
            pos_exp = pos_exp * tl.exp(pos_max - pos_safe) + tl.sum(a * tl.exp(lp - pos_safe[:, None]), 1)
            pos_max = pos_max_new
        elif VARIANT != 2:  # L_out form; epsilon-SupInfoNCE needs the LSE first (second loop below)
            pos_sum += tl.sum(a * l, 1)
        # Rows and columns outside the denominator become -inf before the max, not after.
        l = tl.where(valid, l + _den_bias(rows, cols, row_ok, col_ok, AG, KG, B_SAME, B_OTHER, DEN_BIAS),
                     float("-inf"))
        m_i, sum_exp = _online_lse(m_i, sum_exp, l)
        if VARIANT == 4:
            hard_max_c, hard_exp_c = _online_lse(hard_max_c, hard_exp_c, l * (1.0 + beta))
            hard_max_b, hard_exp_b = _online_lse(hard_max_b, hard_exp_b, l * beta)
    lse = tl.where(sum_exp > 0, m_i + tl.log(sum_exp), float("-inf"))
    if VARIANT == 1:
        pos_sum = tl.where(pos_exp > 0, pos_max + tl.log(pos_exp), float("-inf"))
    if VARIANT == 2:
        # epsilon-SupInfoNCE, second pass: each positive over its own denominator e^{l - eps} + e^{LSE_N}:
        # pos_sum = sum_p [l - logaddexp(l - eps, LSE_N)], and R = sum_p sigmoid(LSE_N + eps - l) for the backward.
        r_sum = tl.zeros([BLOCK_M], ACC)
        for start in range(0, M, BLOCK_N):
            cols, col_ok, l, k, valid, a = _row_tile(q, K, KL, MASK, start, rows, row_ok, anchor_label, offs_d, D, M,
                                                     stride_km, stride_kd, stride_mm, inv_tau, self_offset, mask_rows,
                                                     mask_cols, BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC, DOT_IN_FP32,
                                                     NORMALIZE, OFFSETS_64)
            # l - logaddexp(l - eps, LSE_N) = eps - softplus(gap); -inf without negatives: the term is eps
            gap = lse[:, None] + epsilon - l
            pos_sum += tl.sum(tl.where(a > 0, a * (epsilon - _softplus(gap)), 0.0), 1)
            r_sum += tl.sum(tl.where(a > 0, a * tl.sigmoid(gap), 0.0), 1)
        tl.store(POS_AUX + rows, r_sum, mask=row_ok)
    if VARIANT == 4:
        tl.store(POS_AUX + rows, tl.where(hard_exp_c > 0, hard_max_c + tl.log(hard_exp_c), float("-inf")),
                 mask=row_ok)
        tl.store(POS_AUX + Na + rows, tl.where(hard_exp_b > 0, hard_max_b + tl.log(hard_exp_b), float("-inf")),
                 mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(POS_SUM + rows, pos_sum, mask=row_ok)


@triton.jit
def _tile_grad(l, bias, a, valid, lse, lse_safe, coef, pos_scale, den_scale, epsilon, beta, hard_lse_c, hard_lse_b,
               hard_scale_c, hard_scale_b, VARIANT: tl.constexpr):
    """g_ij = coef_i * (u_i exp(l_ij + b_ij - LSE_i) - positive part) on the denominator, 0 elsewhere, with
    u_i = 1 except where a row function scales it (epsilon-SupInfoNCE: R_i; debiased: dL/dLSE_N). Positive part:
    L_out and debiased a_ij * pos_scale_i (w_i / Z_i, or -dL/dl_p / coef); L_in a_ij exp(l_ij - LSE_P_i)
    (LSE_P passed as pos_scale, 0 on rows without positives); epsilon-SupInfoNCE a_ij sigmoid(LSE_N + eps - l_ij)."""
    if VARIANT == 4:  # hard negatives: only the (1+beta) and beta log-sum-exps enter the row formula
        l_den = l + bias
        p = tl.where(valid, hard_scale_c[:, None] * tl.exp(l_den * (1.0 + beta) - hard_lse_c[:, None])
                     + hard_scale_b[:, None] * tl.exp(l_den * beta - hard_lse_b[:, None]), 0.0)
    else:
        p = tl.where(valid, tl.exp(l + bias - lse_safe[:, None]), 0.0)
    if VARIANT == 2 or VARIANT == 3:
        p = p * den_scale[:, None]
    if VARIANT == 1:
        # Off the positives l - LSE_P can pass 88 (tau = 0.01, or LSE_P = 0 on a row without positives): exp
        # would overflow and inf * 0 give NaN. On a positive l - LSE_P <= -log a_ij, so capping it at 80 (exp
        # finite in fp32) changes nothing there unless a_ij < e^-80; a min costs fewer registers than a select.
        positive = a * tl.exp(tl.minimum(l - pos_scale[:, None], 80.0))
    elif VARIANT == 2:
        positive = tl.where(a > 0, a * tl.sigmoid(lse[:, None] + epsilon - l), 0.0)
    else:
        positive = a * pos_scale[:, None]
    return coef[:, None] * (p - positive)


@triton.jit
def _supcon_bwd_dq_kernel(
    Q, K, INV_TAU, AL, KL, MASK, AG, KG, B_SAME, B_OTHER, LSE, COEF, POS_SCALE, DEN_SCALE, G_SCALE, DQ, GL,
    Na, M, D, self_offset, mask_rows, mask_cols, epsilon, beta,
    stride_qm, stride_qd, stride_km, stride_kd, stride_mm, stride_dqm,
    N_BUCKET,
    TAU_GRAD: tl.constexpr, HAS_SELF: tl.constexpr, USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, NORMALIZE: tl.constexpr, OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr,
    DEN_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Na
    q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, NORMALIZE, ACC, OFFSETS_64)
    inv_tau = tl.load(INV_TAU)
    anchor_label = _anchor_label(AL, rows, row_ok, USE_MASK)
    lse, lse_safe, coef, pos_scale, den_scale, hard_lse_c, hard_lse_b, hard_scale_c, hard_scale_b = \
        _backward_row_stats(rows, row_ok, Na, LSE, COEF, POS_SCALE, DEN_SCALE, VARIANT)

    # g is about coef / M, below fp16's subnormals at large N: the operand of the product is g times a power of
    # two that puts its bound near the dtype's top (one for all rows, as dK needs); dq is unscaled in fp32 below.
    g_scale = tl.load(G_SCALE)
    coef = coef * g_scale
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    # TAU_GRAD: sum_j g_ij l_ij per row from the fp32 tile (dLoss/dtau = -(1/tau) times its sum). It cancels
    # between the softmax and positive terms, so q_i . dQ_i after g's 16-bit rounding would lose most of it.
    gl = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols, col_ok, l, k, valid, a = _row_tile(q, K, KL, MASK, start, rows, row_ok, anchor_label, offs_d, D, M,
                                                 stride_km, stride_kd, stride_mm, inv_tau, self_offset, mask_rows,
                                                 mask_cols, BLOCK_N, HAS_SELF, USE_MASK, PRECISION, ACC, DOT_IN_FP32,
                                                 NORMALIZE, OFFSETS_64)
        bias = _den_bias(rows, cols, row_ok, col_ok, AG, KG, B_SAME, B_OTHER, DEN_BIAS)
        g = _tile_grad(l, bias, a, valid, lse, lse_safe, coef, pos_scale, den_scale, epsilon, beta, hard_lse_c,
                       hard_lse_b, hard_scale_c, hard_scale_b, VARIANT)
        if TAU_GRAD:
            gl += tl.sum(g * l, 1)
        dq += tl.dot(g.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    dq = dq * (inv_tau / g_scale)
    if TAU_GRAD:
        tl.store(GL + rows, gl / g_scale, mask=row_ok)
    tl.store(DQ + _row_offset(rows, stride_dqm, OFFSETS_64)[:, None] + offs_d[None, :], dq,
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _supcon_bwd_dk_kernel(
    Q, K, INV_TAU, AL, KL, MASK, AG, KG, B_SAME, B_OTHER, LSE, COEF, POS_SCALE, DEN_SCALE, G_SCALE, DK,
    Na, M, D, self_offset, mask_rows, mask_cols, epsilon, beta,
    stride_qm, stride_qd, stride_km, stride_kd, stride_mm, stride_dkm,
    N_BUCKET,
    HAS_SELF: tl.constexpr, USE_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, NORMALIZE: tl.constexpr, OFFSETS_64: tl.constexpr, VARIANT: tl.constexpr,
    DEN_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < M
    k = _load_rows(K, cols, col_ok, offs_d, D, stride_km, stride_kd, DOT_IN_FP32, NORMALIZE, ACC, OFFSETS_64)
    inv_tau = tl.load(INV_TAU)
    g_scale = tl.load(G_SCALE)  # as in dQ: the power of two that brings g's operand into the dtype's range
    safe_cols = tl.where(col_ok, cols, -1)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start in range(0, Na, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Na
        q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, NORMALIZE, ACC, OFFSETS_64)
        l = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
        anchor_label = _anchor_label(AL, rows, row_ok, USE_MASK)
        lse, lse_safe, coef, pos_scale, den_scale, hard_lse_c, hard_lse_b, hard_scale_c, hard_scale_b = \
            _backward_row_stats(rows, row_ok, Na, LSE, COEF, POS_SCALE, DEN_SCALE, VARIANT)
        valid = _in_denominator(rows, cols, row_ok, col_ok, self_offset, HAS_SELF)
        a = _positive_weights(rows, safe_cols, row_ok, valid, anchor_label, KL, MASK,
                              mask_rows, mask_cols, stride_mm, USE_MASK, ACC, OFFSETS_64)
        bias = _den_bias(rows, cols, row_ok, col_ok, AG, KG, B_SAME, B_OTHER, DEN_BIAS)
        g = _tile_grad(l, bias, a, valid, lse, lse_safe, coef * g_scale, pos_scale, den_scale, epsilon, beta,
                       hard_lse_c, hard_lse_b, hard_scale_c, hard_scale_b, VARIANT)
        dk += tl.dot(tl.trans(g).to(q.dtype), q, input_precision=PRECISION, out_dtype=ACC)
    dk = dk * (inv_tau / g_scale)
    tl.store(DK + _row_offset(cols, stride_dkm, OFFSETS_64)[:, None] + offs_d[None, :], dk,
             mask=col_ok[:, None] & (offs_d[None, :] < D))


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
    ("bwd", 4): {64: [(32, 32, 4, 2)]},
}
# Before Hopper, mma.sync keeps more of the tile in registers: the 128-row backward tile spills there.
PRE_HOPPER_DROP = {("bwd", 2): {128: [(128, 64, 8, 3)]}}
# The bias tile (two table lookups per key) costs the 128-row backward tile its last registers; the row
# formulas' extra per-row scale (epsilon-SupInfoNCE, debiased) costs the 32-row one at D = 512 on sm_90.
DEN_BIAS_DROP = {("bwd", 2): {128: [(128, 64, 8, 3)]}}
ROW_SCALE_DROP = {("bwd", 2): {128: [(128, 64, 8, 3)], 512: [(32, 32, 8, 2)]}}
INTERPRETER = (32, 32, 4, 2)  # the interpreter runs one op per tile in numpy: few, mid-sized tiles
FP32_MAX_D = 64


def _config(shape):
    m, n, w, st = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)


def tile_shapes(family: str, elem_bytes: int, block_d: int, arch: int, n: int, den_bias: bool = False,
                variant: int = 0):
    """The (BLOCK_M, BLOCK_N, warps, stages) the autotuner may try for one launch."""
    bucket = max(64, block_d)
    shapes = TILE_CONFIGS[(family, elem_bytes)][bucket]
    if n <= 64:  # one tile does it all: the smallest shape, no tuning
        return shapes[-1:]
    for drop, applies in ((PRE_HOPPER_DROP, arch < 90), (DEN_BIAS_DROP, den_bias), (ROW_SCALE_DROP, variant >= 2)):
        if applies:
            dropped = drop.get((family, elem_bytes), {}).get(bucket, [])
            shapes = [sh for sh in shapes if sh not in dropped]
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
        shapes = sorted({sh for (fam, _), table in TILE_CONFIGS.items() if fam == family for t in table.values()
                         for sh in t})
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
supcon_bwd_dk = TunedKernel(_supcon_bwd_dk_kernel, "bwd")


# The row formula per spec.variant: 0 L_out, 1 L_in, 2 epsilon-SupInfoNCE (second pass over the positives),
# 3 debiased (L_out's statistics; the row function's derivatives scale the backward's two terms).
VARIANTS = {"out": 0, "in": 1, "eps": 2, "debiased": 3, "debiased_hard": 4}


def variant_code(spec) -> int:
    """Variant 4: debiased with hard-negative reweighting (two more online LSEs, of (1+beta) l and beta l)."""
    return VARIANTS["debiased_hard" if spec.variant == "debiased" and spec.beta != 0 else spec.variant]


def why_not(spec) -> str | None:
    """Why these kernels cannot run the spec (None: they can)."""
    if spec.device.type != "cuda" and not _interpreting():
        return f"inputs are on {spec.device.type}; Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
    if spec.variant not in VARIANTS:
        return f"no kernel for the row formula {spec.variant!r}"
    dim = spec.keys.shape[1]
    if dim > MAX_D:
        return f"feature dimension {dim} > {MAX_D}: the kernels keep whole rows in registers"
    if _interpreting():
        return None
    if spec.keys.dtype == torch.float64:
        return "float64 inputs: the kernels use tensor cores (fp32/fp16/bf16); use chunked or reference"
    if spec.keys.dtype == torch.float32 and dim > FP32_MAX_D:
        return (f"float32 inputs with D = {dim} > {FP32_MAX_D}: whole fp32 rows would spill registers; "
                "pass bf16/fp16 features, or use chunked (cuBLAS) for fp32")
    return None


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
        NORMALIZE=bool(spec.normalize),
        OFFSETS_64=offsets_64(Q, K, mask),
        epsilon=float(spec.epsilon), beta=float(spec.beta), VARIANT=variant_code(spec), DEN_BIAS=bias is not None,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )


def forward_stats(spec, Q, K, inv_tau):
    """(lse, pos_sum, pos_aux) per anchor in the accumulation dtype; pos_aux: R_i for epsilon-SupInfoNCE,
    [2, Na] LSEs of (1+beta) l and beta l for hard negatives."""
    args = _common_args(spec, Q, K, inv_tau)
    lse = torch.empty(Q.shape[0], dtype=spec.accum_dtype, device=K.device)
    pos_sum = torch.empty_like(lse)
    code = variant_code(spec)
    pos_aux = lse
    if code in (2, 4):
        pos_aux = torch.empty((2 if code == 4 else 1, Q.shape[0]), dtype=lse.dtype, device=K.device)
    grid = lambda meta: (triton.cdiv(Q.shape[0], meta["BLOCK_M"]),)  # noqa: E731
    supcon_fwd[grid](LSE=lse, POS_SUM=pos_sum, POS_AUX=pos_aux, **args)
    return lse, pos_sum, pos_aux[0] if code == 2 else pos_aux


def grad_scale(spec, rows, dtype: torch.dtype):
    """The power of two that multiplies the gradient tile g before its cast to ``dtype`` for the dQ and dK
    products, a one-element tensor computed on the device (no host sync). g_ij = coef_i h_ij is about coef / M,
    under fp16's subnormals from N of a few thousand, so the operand is g times the largest power of two that
    keeps a bound of |g| at or below the largest power of two under the dtype's finite maximum (2**15 for fp16:
    a factor of about 2 spare for rounding in the bound); the fp32 accumulators divide it out. One scale for
    all rows: dK sums over rows, and a per-row one in dQ cost registers (spills at D = 512) for rows whose
    coef differs from the others' (the mean loss has one coef). The bound, from the
    per-row factors: |h_ij| <= (denominator part) + (positive part), each of |exp(l + b - LSE)| <= 1 times its
    row scale, with the positive weights a_ij at most ``a_max``."""
    code = variant_code(spec)
    mask = spec.mask
    a_max = 1.0 if mask is None or mask.dtype == torch.uint8 else mask.amax().to(rows.coef.dtype)
    if code in (0, 1):
        den = 1.0
    elif code in (2, 3):
        den = rows.den_scale.abs()
    else:  # hard negatives: the (1+beta) and beta terms' scales
        den = rows.den_scale[1].abs() + rows.den_scale[2].abs()
    # L_in's a_ij exp(l_ij - LSE_P) <= 1; epsilon-SupInfoNCE's a_ij sigmoid(.) <= a_ij; otherwise a_ij pos_scale_i.
    pos = 1.0 if code == 1 else a_max if code == 2 else a_max * rows.pos_scale.abs()
    bound = (rows.coef.abs() * (den + pos)).to(torch.float32)
    top = math.floor(math.log2(torch.finfo(dtype).max))
    exponent = torch.floor(top - torch.log2(bound))
    # |exponent| <= 64 keeps the scale and its inverse normal in fp32; a zero bound (no gradient) takes 2**64.
    return torch.exp2(exponent.clamp(-64.0, 64.0)).amin().reshape(1).to(rows.coef.dtype)


def backward_grads(spec, Q, K, inv_tau, rows, need_dq=True, need_dk=True, logit_sums=False):
    """dQ and dK (input dtype) for the per-row backward factors ``rows`` (RowFactors), recomputing every
    tile from lse; with ``logit_sums`` also sum_j g_ij l_ij per anchor (accumulation dtype), from the dQ pass."""
    args = _common_args(spec, Q, K, inv_tau)
    factors = dict(LSE=rows.lse, COEF=rows.coef, POS_SCALE=rows.pos_scale, DEN_SCALE=rows.den_scale)
    g_scale = grad_scale(spec, rows, K.dtype)
    dq = dk = sums = None
    if need_dq or logit_sums:
        # Stored in the input dtype (accumulated in fp32 registers): at N = 1M, D = 128 fp32 copies
        # of dQ and dK alone would take 1 GB.
        dq = torch.empty(Q.shape, dtype=Q.dtype, device=K.device)
        sums = torch.empty(Q.shape[0] if logit_sums else 1, dtype=spec.accum_dtype, device=K.device)
        grid = lambda meta: (triton.cdiv(Q.shape[0], meta["BLOCK_M"]),)  # noqa: E731
        supcon_bwd_dq[grid](DQ=dq, stride_dqm=dq.stride(0), G_SCALE=g_scale, GL=sums, TAU_GRAD=bool(logit_sums),
                            **factors, **args)
    if need_dk:
        dk = torch.empty(K.shape, dtype=K.dtype, device=K.device)
        grid = lambda meta: (triton.cdiv(K.shape[0], meta["BLOCK_N"]),)  # noqa: E731
        supcon_bwd_dk[grid](DK=dk, stride_dkm=dk.stride(0), G_SCALE=g_scale, **factors, **args)
    return (dq if need_dq else None, dk, sums) if logit_sums else (dq if need_dq else None, dk)


# ----------------------------------------------------------------------------- autograd and API (shared)

KERNELS = fused.Kernels("triton", forward_stats, backward_grads, logit_sums=True)


def loss(spec):
    return fused.loss(spec, KERNELS)


def loss_and_grads(spec):
    return fused.loss_and_grads(spec, KERNELS)


def row_stats(spec):
    return fused.row_stats(spec, KERNELS)


def grads_from_stats(spec, lse, coef, pos_scale):
    return fused.grads_from_stats(spec, lse, coef, pos_scale, KERNELS)
