"""Soft per-pair targets (SCE's teacher similarities, CoMatch's pseudo-label graph) as fused Triton kernels.

Read top to bottom: the tile helpers and four kernels (the target's row normaliser; the forward's per-row
LSE and weighted logit sum; dQ row-parallel; dK column-parallel), their launchers, the three per-shard
operations ring mode merges (``soft_norm``, ``soft_stats``, ``soft_grads``), and the single-process loss
(those three over one shard holding every key) with its autograd.Function.

Row i's loss is a cross-entropy against a target w_ij over its denominator keys:
``L_i = LSE_i - sum_j w_ij (l_ij + b_ij)``, ``l_ij = q_i . k_j / tau``, and its gradient in the logits is
``p_ij - w_ij`` with ``p_ij = exp(l_ij + b_ij - LSE_i)``. The target comes from O(N) side rows (teacher
embeddings or class probabilities: ``side_ij = anchor_side_i . key_side_j``), so every tile computes two
products, the feature one and the side one, and rebuilds its own block of w; nothing of size Na x M is
ever written. The side rows are small and kept in fp32 (an fp32 product on tensor cores, three tf32
passes), read in chunks of BLOCK_S columns so that a wide teacher costs no registers.

The target needs its row normaliser over every key before any w_ij is known (the teacher's LSE over the
candidate keys, the graph's row sum), hence one more pass, cheap: the side product only, no feature product
and no exponential for the graph. The normaliser, like the LSE, merges across key shards (logaddexp, sum),
which is what ring mode relies on. Given it, w_ij of one tile is

    w_ij = pos_w_i [j positive] + soft_w_i f(side_ij) [j a candidate: in the denominator, not positive]

with f = exp(side / tau_t - norm_i) for the teacher (pos_w = lam / pos_count, soft_w = 1 - lam; lam = 1 on a
row without candidates) and f = side if side >= threshold else 0 for the graph (pos_w = soft_w = 1 / norm_i:
the self-loop weighs 1). The launcher turns (norm, pos_count) into those three per-row factors once.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fused_contrastive.spec import inverse_pos_count, reduce_rows
from fused_contrastive.triton_kernels.supcon import (INTERPRETER, LOG2E, offsets_64, rows_why_not, _autotune_options,
                                                     _config, _den_bias, _device_guard, _interpreting, _load_rows,
                                                     _log_of_sum, _normalized, _online_lse, _precision, _row_offset)

KINDS = {"teacher": 0, "graph": 1}

# ----------------------------------------------------------------------------- tile helpers


@triton.jit
def _pairs(rows, cols, row_ok, col_ok, AL, KL, AG, KG, B_SAME, B_OTHER, self_offset, HAS_SELF: tl.constexpr,
           DEN_BIAS: tl.constexpr):
    """(in_den, bias, pos) of one tile: the keys of each anchor's denominator (in range, not self, b > -inf),
    the denominator log-weights (0 outside it) and the positives (equal labels, inside the denominator)."""
    in_den = row_ok[:, None] & col_ok[None, :]
    if HAS_SELF:
        in_den = in_den & (cols[None, :] != (rows + self_offset)[:, None])
    bias = _den_bias(rows, cols, row_ok, col_ok, AG, KG, B_SAME, B_OTHER, DEN_BIAS)
    if DEN_BIAS:
        in_den = in_den & (bias > float("-inf"))
        bias = tl.where(in_den, bias, 0.0)
    anchor_label = tl.load(AL + rows, mask=row_ok, other=-2)
    key_label = tl.load(KL + cols, mask=col_ok, other=-1)
    pos = in_den & (anchor_label[:, None] == key_label[None, :])
    return in_den, bias, pos


@triton.jit
def _side_product(A_SIDE, K_SIDE, rows, cols, row_ok, col_ok, S, stride_as, stride_ks, SIDE_PRECISION: tl.constexpr,
                  ACC: tl.constexpr, OFFSETS_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """side_ij = anchor_side_i . key_side_j for one tile, BLOCK_S columns at a time (zero past S)."""
    offs_s = tl.arange(0, BLOCK_S)
    side = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for s0 in range(0, S, BLOCK_S):
        s_ok = (s0 + offs_s) < S
        a = tl.load(A_SIDE + _row_offset(rows, stride_as, OFFSETS_64)[:, None] + (s0 + offs_s)[None, :],
                    mask=row_ok[:, None] & s_ok[None, :], other=0.0)
        k = tl.load(K_SIDE + _row_offset(cols, stride_ks, OFFSETS_64)[:, None] + (s0 + offs_s)[None, :],
                    mask=col_ok[:, None] & s_ok[None, :], other=0.0)
        side += tl.dot(a, tl.trans(k), input_precision=SIDE_PRECISION, out_dtype=ACC)
    return side


@triton.jit
def _target(side, in_den, pos, pos_w, soft_w, shift, inv_tau_t, threshold, KIND: tl.constexpr):
    """w_ij of one tile from the per-row factors (see the module docstring); 0 outside the denominator."""
    candidate = in_den & (pos == 0)
    if KIND == 0:  # teacher: softmax over the candidates, the row's global LSE ``shift`` subtracted (<= 0)
        f = tl.where(candidate, tl.math.exp2((side * inv_tau_t - shift[:, None]) * LOG2E), 0.0)
    else:  # graph: the probability product where it reaches the threshold
        f = tl.where(candidate & (side >= threshold), side, 0.0)
    return tl.where(pos, pos_w[:, None], 0.0) + soft_w[:, None] * f


@triton.jit
def _row_factors(ROW, rows, row_ok, Na):
    """(pos_w, soft_w, shift) of these rows from the launcher's [3, Na] buffer."""
    pos_w = tl.load(ROW + rows, mask=row_ok, other=0.0)
    soft_w = tl.load(ROW + Na + rows, mask=row_ok, other=0.0)
    shift = tl.load(ROW + 2 * Na + rows, mask=row_ok, other=0.0)
    return pos_w, soft_w, shift


@triton.jit
def _row_grad(s, bias, side, in_den, pos, lse2, pos_w, soft_w, shift, inv_tau, inv_tau_t, threshold,
              KIND: tl.constexpr):
    """(p_ij - w_ij) of one tile, 0 outside the denominator; lse2 = LSE_i log2(e) (0 on a row without keys)."""
    p = tl.where(in_den, tl.math.exp2((s * inv_tau + bias) * LOG2E - lse2[:, None]), 0.0)
    return p - _target(side, in_den, pos, pos_w, soft_w, shift, inv_tau_t, threshold, KIND)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _soft_norm_kernel(
    A_SIDE, K_SIDE, AL, KL, AG, KG, B_SAME, B_OTHER, NORM,
    Na, M, S, self_offset, inv_tau_t, threshold, stride_as, stride_ks,
    N_BUCKET,  # autotuning key only
    KIND: tl.constexpr, HAS_SELF: tl.constexpr, DEN_BIAS: tl.constexpr, SIDE_PRECISION: tl.constexpr,
    ACC: tl.constexpr, OFFSETS_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """The target's row normaliser over these keys: teacher, log sum_j exp(side_ij / tau_t) over the candidates
    (-inf when none); graph, sum_j u_ij with u = 1 on positives and the thresholded product on candidates."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Na
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    total = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        in_den, bias, pos = _pairs(rows, cols, row_ok, col_ok, AL, KL, AG, KG, B_SAME, B_OTHER, self_offset,
                                   HAS_SELF, DEN_BIAS)
        side = _side_product(A_SIDE, K_SIDE, rows, cols, row_ok, col_ok, S, stride_as, stride_ks, SIDE_PRECISION,
                             ACC, OFFSETS_64, BLOCK_M, BLOCK_N, BLOCK_S)
        candidate = in_den & (pos == 0)
        if KIND == 0:
            m_i, total = _online_lse(m_i, total, tl.where(candidate, side, float("-inf")), inv_tau_t * LOG2E)
        else:
            u = tl.where(pos, 1.0, tl.where(candidate & (side >= threshold), side, 0.0))
            total += tl.sum(u, 1)
    if KIND == 0:
        norm = _log_of_sum(m_i, total, inv_tau_t)
    else:
        norm = total
    tl.store(NORM + rows, norm, mask=row_ok)


@triton.jit
def _soft_fwd_kernel(
    Q, K, INV_TAU, A_SIDE, K_SIDE, AL, KL, AG, KG, B_SAME, B_OTHER, ROW, LSE, WSUM,
    Na, M, D, S, self_offset, inv_tau_t, threshold,
    stride_qm, stride_qd, stride_km, stride_kd, stride_as, stride_ks,
    N_BUCKET,
    KIND: tl.constexpr, HAS_SELF: tl.constexpr, DEN_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    SIDE_PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per anchor over these keys: LSE_i of l + b on the denominator (online max, natural logs) and
    wsum_i = sum_j w_ij (l_ij + b_ij) with the global normaliser's factors (ROW)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Na
    q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, OFFSETS_64, True)
    inv_tau = tl.load(INV_TAU)
    pos_w, soft_w, shift = _row_factors(ROW, rows, row_ok, Na)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    sum_exp = tl.zeros([BLOCK_M], ACC)
    wsum = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        k = _load_rows(K, cols, col_ok, offs_d, D, stride_km, stride_kd, DOT_IN_FP32, OFFSETS_64, True)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
        in_den, bias, pos = _pairs(rows, cols, row_ok, col_ok, AL, KL, AG, KG, B_SAME, B_OTHER, self_offset,
                                   HAS_SELF, DEN_BIAS)
        logits = logits + bias  # finite everywhere (padding rows and columns are zero products)
        # rows and columns outside the denominator become -inf before the max, not after
        m_i, sum_exp = _online_lse(m_i, sum_exp, tl.where(in_den, logits, float("-inf")), LOG2E)
        side = _side_product(A_SIDE, K_SIDE, rows, cols, row_ok, col_ok, S, stride_as, stride_ks, SIDE_PRECISION,
                             ACC, OFFSETS_64, BLOCK_M, BLOCK_N, BLOCK_S)
        w = _target(side, in_den, pos, pos_w, soft_w, shift, inv_tau_t, threshold, KIND)
        wsum += tl.sum(w * logits, 1)
    tl.store(LSE + rows, _log_of_sum(m_i, sum_exp, 1.0), mask=row_ok)
    tl.store(WSUM + rows, wsum, mask=row_ok)


@triton.jit
def _soft_bwd_dq_kernel(
    Q, K, INV_TAU, A_SIDE, K_SIDE, AL, KL, AG, KG, B_SAME, B_OTHER, ROW, LSE, COEF, G_LOG2, DQ, GL,
    Na, M, D, S, self_offset, inv_tau_t, threshold,
    stride_qm, stride_qd, stride_km, stride_kd, stride_as, stride_ks, stride_dqm,
    N_BUCKET,
    TAU_GRAD: tl.constexpr, KIND: tl.constexpr, HAS_SELF: tl.constexpr, DEN_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, SIDE_PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    OFFSETS_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """dQ_i = coef_i sum_j (p_ij - w_ij) k_j / tau. The tile's 16-bit operand is (p - w) 2^G_LOG2 (|p - w| <= 1;
    fp16 alone needs the scale, its subnormals start near 1/M), divided out of the fp32 product; coef_i is
    applied after it. TAU_GRAD: also GL_i = sum_j (p_ij - w_ij) q_i . k_j from the fp32 tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Na
    q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, OFFSETS_64, True)
    inv_tau = tl.load(INV_TAU)
    g_scale = tl.math.exp2(tl.load(G_LOG2))
    pos_w, soft_w, shift = _row_factors(ROW, rows, row_ok, Na)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    gl = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        k = _load_rows(K, cols, col_ok, offs_d, D, stride_km, stride_kd, DOT_IN_FP32, OFFSETS_64, True)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        in_den, bias, pos = _pairs(rows, cols, row_ok, col_ok, AL, KL, AG, KG, B_SAME, B_OTHER, self_offset,
                                   HAS_SELF, DEN_BIAS)
        side = _side_product(A_SIDE, K_SIDE, rows, cols, row_ok, col_ok, S, stride_as, stride_ks, SIDE_PRECISION,
                             ACC, OFFSETS_64, BLOCK_M, BLOCK_N, BLOCK_S)
        g = _row_grad(s, bias, side, in_den, pos, lse2, pos_w, soft_w, shift, inv_tau, inv_tau_t, threshold, KIND)
        if TAU_GRAD:
            gl += tl.sum(g * s, 1)
        dq += tl.dot((g * g_scale).to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    dq = dq * (coef * (inv_tau / g_scale))[:, None]
    d_ok = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DQ + _row_offset(rows, stride_dqm, OFFSETS_64)[:, None] + offs_d[None, :], dq, mask=d_ok)
    if TAU_GRAD:
        tl.store(GL + rows, gl, mask=row_ok)


@triton.jit
def _soft_bwd_dk_kernel(
    Q, K, INV_TAU, A_SIDE, K_SIDE, AL, KL, AG, KG, B_SAME, B_OTHER, ROW, LSE, COEF, G_LOG2, DK,
    Na, M, D, S, self_offset, inv_tau_t, threshold,
    stride_qm, stride_qd, stride_km, stride_kd, stride_as, stride_ks, stride_dkm,
    N_BUCKET,
    KIND: tl.constexpr, HAS_SELF: tl.constexpr, DEN_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    SIDE_PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dK_j = sum_i coef_i (p_ij - w_ij) q_i / tau, one block of keys per program (no atomics). The 16-bit
    operand is coef_i (p - w) 2^G_LOG2 (coef_i ~ 1/Na: fp16 needs the scale), divided out of the fp32 sum."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < M
    k = _load_rows(K, cols, col_ok, offs_d, D, stride_km, stride_kd, DOT_IN_FP32, OFFSETS_64, True)
    inv_tau = tl.load(INV_TAU)
    g_scale = tl.math.exp2(tl.load(G_LOG2))
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start in range(0, Na, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Na
        q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, OFFSETS_64, True)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        in_den, bias, pos = _pairs(rows, cols, row_ok, col_ok, AL, KL, AG, KG, B_SAME, B_OTHER, self_offset,
                                   HAS_SELF, DEN_BIAS)
        side = _side_product(A_SIDE, K_SIDE, rows, cols, row_ok, col_ok, S, stride_as, stride_ks, SIDE_PRECISION,
                             ACC, OFFSETS_64, BLOCK_M, BLOCK_N, BLOCK_S)
        pos_w, soft_w, shift = _row_factors(ROW, rows, row_ok, Na)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
        coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
        g = _row_grad(s, bias, side, in_den, pos, lse2, pos_w, soft_w, shift, inv_tau, inv_tau_t, threshold, KIND)
        g = g * (coef * g_scale)[:, None]
        dk += tl.dot(tl.trans(g).to(q.dtype), q, input_precision=PRECISION, out_dtype=ACC)
    dk = dk * (inv_tau / g_scale)
    d_ok = col_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DK + _row_offset(cols, stride_dkm, OFFSETS_64)[:, None] + offs_d[None, :], dk, mask=d_ok)


# ----------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by input width and BLOCK_D bucket. Each tile holds two fp32
# [BLOCK_M, BLOCK_N] products (features and side; the side's, three tf32 passes, costs more registers than a
# 16-bit one) besides what supcon's tiles hold, so the shapes are smaller than supcon's or have more warps;
# every one compiles for sm_80 and sm_90 without spills (bench/results/triton_aot_soft_sm80_sm90.txt: with
# mma.sync, sm_80 is mostly the tighter one; 64 x 64 tiles spill there, 32 x 32 with 8 warps at D = 512 in dQ,
# and at D = 64, 32 x 32 spills in one kernel or another with 4 or 8 warps, 1 or 2 stages).
TILE_CONFIGS = {
    2: {64: [(64, 32, 8, 2), (16, 32, 4, 2)],
        128: [(64, 32, 8, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2)],
        512: [(16, 32, 8, 2)]},
    4: {64: [(16, 32, 8, 2)]},  # fp32 features and side products, both three tf32 passes: 32 rows spill
}
# The normaliser's pass holds only the side product and its per-row sums.
NORM_CONFIGS = [(64, 32, 4, 2), (32, 32, 4, 2)]
BLOCK_S_MAX = 32  # side columns per chunk of the side product
TUNING_KEY = ["D", "S", "N_BUCKET", "KIND", "HAS_SELF", "DEN_BIAS", "PRECISION"]
NORM_TUNING_KEY = ["S", "N_BUCKET", "KIND", "HAS_SELF", "DEN_BIAS"]


def tile_shapes(family: str, elem_bytes: int, block_d: int, n: int):
    """The (BLOCK_M, BLOCK_N, warps, stages) the autotuner may try: family "norm" or "tile" (the three kernels
    with a feature product); the smallest alone when one tile covers the batch."""
    shapes = NORM_CONFIGS if family == "norm" else TILE_CONFIGS[elem_bytes][max(64, block_d)]
    return shapes[-1:] if n <= 64 else shapes


def _pruner(family: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # launchers pass everything by keyword
        if _interpreting():  # one config: launched directly, never benchmarked
            return [_config(INTERPRETER)]
        width = args["Q"].element_size() if family == "tile" else 4
        return [_config(sh) for sh in tile_shapes(family, width, args.get("BLOCK_D", 64), max(args["Na"], args["M"]))]
    return prune


class TunedKernel:
    """``kernel[grid](**args)`` autotuned over the pruned configs, under the inputs' device; one surviving
    config is launched directly (supcon.TunedKernel's rule)."""

    def __init__(self, kernel, family: str):
        self.kernel, self.prune = kernel, _pruner(family)
        tables = NORM_CONFIGS if family == "norm" else [sh for t in TILE_CONFIGS.values() for v in t.values() for sh in v]
        self.configs = [_config(sh) for sh in sorted(set(tables))]
        self.tuner = triton.autotune(configs=self.configs, key=NORM_TUNING_KEY if family == "norm" else TUNING_KEY,
                                     prune_configs_by={"early_config_prune": self.prune}, **_autotune_options())(kernel)

    def __getitem__(self, grid):
        def launch(**args):
            with _device_guard(args["K_SIDE"].device):
                configs = self.prune(self.configs, {}, **args)
                if len(configs) == 1:
                    return self.kernel[grid](**args, **configs[0].all_kwargs())
                return self.tuner[grid](**args)
        return launch


soft_norm_kernel = TunedKernel(_soft_norm_kernel, "norm")
soft_fwd = TunedKernel(_soft_fwd_kernel, "tile")
soft_bwd_dq = TunedKernel(_soft_bwd_dq_kernel, "tile")
soft_bwd_dk = TunedKernel(_soft_bwd_dk_kernel, "tile")


def why_not(spec) -> str | None:
    """Why these kernels cannot run the soft-target spec (None: they can)."""
    if spec.device.type != "cuda" and not _interpreting():
        return f"inputs are on {spec.device.type}; Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
    if spec.soft_target.kind not in KINDS:
        return f"no kernel for the soft target kind {spec.soft_target.kind!r}"
    if spec.mask is not None or spec.variant != "out":
        return "soft per-pair targets take labels and the plain softmax row (no dense mask, no other row formula)"
    return rows_why_not(spec.keys.dtype, spec.device, spec.keys.shape[1])


def _side_precision(dtype: torch.dtype) -> str:
    """The side product's: fp32 on tensor cores to fp32 accuracy (three tf32 passes) whatever the user's tf32
    setting, since a rounded target moves the loss itself; the interpreter and float64 multiply exactly."""
    return "ieee" if dtype == torch.float64 or _interpreting() else "tf32x3"


def _side(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return x.detach().to(acc).contiguous()


def _args(spec, Q, K):
    """The arguments every kernel shares (the norm pass ignores the feature ones)."""
    target = spec.soft_target
    acc = spec.accum_dtype
    a_side, k_side = _side(target.anchor_side, acc), _side(target.key_side, acc)
    width = k_side.shape[1]
    bias = spec.den_bias
    dummy = torch.zeros(1, dtype=torch.int64, device=K.device)
    dummy_acc = torch.zeros(1, dtype=acc, device=K.device)
    dim = K.shape[1]
    return dict(
        Q=Q, K=K, A_SIDE=a_side, K_SIDE=k_side, AL=spec.anchor_labels, KL=spec.key_labels,
        AG=bias.anchor_groups if bias is not None else dummy, KG=bias.key_groups if bias is not None else dummy,
        B_SAME=bias.same if bias is not None else dummy_acc, B_OTHER=bias.other if bias is not None else dummy_acc,
        Na=Q.shape[0], M=K.shape[0], D=dim, S=width,
        self_offset=spec.self_offset if spec.self_offset is not None else 0,
        inv_tau_t=1.0 / float(target.tau_t), threshold=float(target.threshold),
        stride_qm=Q.stride(0), stride_qd=Q.stride(1), stride_km=K.stride(0), stride_kd=K.stride(1),
        stride_as=a_side.stride(0), stride_ks=k_side.stride(0),
        N_BUCKET=triton.next_power_of_2(max(Q.shape[0], K.shape[0])),
        KIND=KINDS[target.kind], HAS_SELF=spec.self_offset is not None, DEN_BIAS=bias is not None,
        PRECISION=_precision(K.dtype), SIDE_PRECISION=_side_precision(acc),
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        DOT_IN_FP32=_interpreting() and K.dtype == torch.bfloat16,
        OFFSETS_64=offsets_64(Q, K, None) or max(Q.shape[0], K.shape[0]) * max(width, 1) >= 2**31,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_S=min(BLOCK_S_MAX, max(16, triton.next_power_of_2(width))),
    )


_FEATURE_ARGS = ("Q", "K", "D", "stride_qm", "stride_qd", "stride_km", "stride_kd", "PRECISION", "DOT_IN_FP32",
                 "BLOCK_D")


def _rows_grid(meta, n):
    return (triton.cdiv(n, meta["BLOCK_M"]),)


def _target_factors(spec, norm, pos_count):
    """[3, Na] (pos_w, soft_w, shift) from the GLOBAL normaliser and positive count (module docstring)."""
    acc = spec.accum_dtype
    target = spec.soft_target
    norm, pos_count = norm.to(acc), pos_count.to(acc)
    if target.kind == "teacher":
        no_candidate = norm == float("-inf")
        # (a tensor in the accumulation dtype: torch.where of two Python floats would round lam to float32)
        lam = torch.full_like(norm, target.lam).masked_fill_(no_candidate, 1.0)
        return torch.stack([lam * inverse_pos_count(pos_count), 1 - lam, torch.where(no_candidate, 0.0, norm)])
    inv_norm = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0)
    return torch.stack([inv_norm, inv_norm, torch.zeros_like(norm)])


def _grad_log2(dtype, bound: torch.Tensor) -> torch.Tensor:
    """log2 of the power of two that scales a 16-bit gradient operand whose magnitude is at most ``bound``
    (one-element tensor, no host sync): fp16 only (bf16 and fp32 have fp32's exponent range); the largest
    power keeping the operand <= 2^15, |exponent| <= 64."""
    zero = torch.zeros(1, dtype=bound.dtype, device=bound.device)
    if dtype != torch.float16:
        return zero
    top = math.floor(math.log2(torch.finfo(dtype).max))
    return torch.floor(top - torch.log2(bound.amax().reshape(1))).clamp(-64.0, 64.0)


def launch_norm(spec, Q, K):
    args = _args(spec, Q, K)
    for name in _FEATURE_ARGS:
        args.pop(name)
    norm = torch.empty(Q.shape[0], dtype=spec.accum_dtype, device=K.device)
    soft_norm_kernel[lambda meta: _rows_grid(meta, args["Na"])](NORM=norm, **args)
    return norm


def launch_stats(spec, Q, K, inv_tau, factors):
    args = _args(spec, Q, K)
    lse = torch.empty(Q.shape[0], dtype=spec.accum_dtype, device=K.device)
    wsum = torch.empty_like(lse)
    soft_fwd[lambda meta: _rows_grid(meta, args["Na"])](INV_TAU=inv_tau, ROW=factors.contiguous(), LSE=lse, WSUM=wsum,
                                                         **args)
    return lse, wsum


def launch_grads(spec, Q, K, inv_tau, factors, lse, coef, need_dq=True, need_dk=True, logit_sums=False):
    """(dQ, dK, GL) in the accumulation dtype for g_ij = coef_i (p_ij - w_ij); GL_i = sum_j (p - w) q_i . k_j when
    ``logit_sums`` (else None); dQ None unless ``need_dq`` or ``logit_sums``, dK None unless ``need_dk``."""
    args = _args(spec, Q, K)
    acc = spec.accum_dtype
    factors, lse, coef = factors.contiguous(), lse.to(acc).contiguous(), coef.to(acc).contiguous()
    common = dict(INV_TAU=inv_tau, ROW=factors, LSE=lse, COEF=coef, **args)
    dq = dk = gl = None
    if need_dq or logit_sums:
        dq = torch.empty(Q.shape, dtype=acc, device=K.device)
        gl = torch.empty(Q.shape[0] if logit_sums else 1, dtype=acc, device=K.device)
        g_log2 = _grad_log2(K.dtype, torch.ones(1, dtype=acc, device=K.device))
        soft_bwd_dq[lambda meta: _rows_grid(meta, args["Na"])](G_LOG2=g_log2, DQ=dq, GL=gl, stride_dqm=dq.stride(0),
                                                                TAU_GRAD=bool(logit_sums), **common)
    if need_dk:
        dk = torch.empty(K.shape, dtype=acc, device=K.device)
        bound = coef.abs().amax().reshape(1) if coef.numel() else torch.zeros(1, dtype=acc, device=K.device)
        g_log2 = _grad_log2(K.dtype, bound)
        soft_bwd_dk[lambda meta: (triton.cdiv(args["M"], meta["BLOCK_N"]),)](G_LOG2=g_log2, DK=dk,
                                                                            stride_dkm=dk.stride(0), **common)
    return dq, dk, (gl if logit_sums else None)


def _inv_tau(spec, tau_tensor=None):
    """1/tau as a one-element tensor (a learnable temperature needs no host round trip)."""
    acc = spec.accum_dtype
    if tau_tensor is not None:
        return (1.0 / tau_tensor.detach().to(device=spec.device, dtype=acc)).reshape(1)
    return torch.full((1,), 1.0 / spec.tau_value(), dtype=acc, device=spec.device)


# ----------------------------------------------------------------------------- per-shard operations (ring mode)
#
# A shard spec holds this rank's anchors against one shard of the keys (labels, biases and side rows of those
# keys). The single-process loss below is these three over one shard holding every key.


def soft_norm(spec) -> torch.Tensor:
    """[Na] the target's row normaliser over this spec's keys: teacher, log sum_j exp(t_ij / tau_t) over the
    candidate keys (-inf when none; merge by logaddexp); graph, sum_j u_ij (merge by sum)."""
    Q, K = _normalized(spec, spec.anchors, spec.keys)
    return launch_norm(spec, Q, K)


def soft_stats(spec, norm, pos_count):
    """(lse [Na], wsum [Na]) over this spec's keys given the global normaliser and positive count: LSE of the
    denominator (merge by logaddexp) and sum_j w_ij (l_ij + b_ij) (merge by sum)."""
    Q, K = _normalized(spec, spec.anchors, spec.keys)
    return launch_stats(spec, Q, K, _inv_tau(spec), _target_factors(spec, norm, pos_count))


def soft_grads(spec, lse, norm, pos_count, coef):
    """(dQ, dK) in the accumulation dtype of this spec's tiles for g_ij = coef_i (p_ij - w_ij) with the merged
    lse, the global normaliser and positive count, divided by tau (dQ = sum_j g k / tau, dK = sum_i g q / tau)."""
    Q, K = _normalized(spec, spec.anchors, spec.keys)
    dq, dk, _ = launch_grads(spec, Q, K, _inv_tau(spec), _target_factors(spec, norm, pos_count), lse, coef)
    return dq, dk


# ----------------------------------------------------------------------------- single-process loss


class SoftTritonRows(torch.autograd.Function):
    """The unweighted rows L_i (0 on rows without positives) of a soft-target spec; the reduction is applied
    outside by torch ops. Saves only O(Na) per-row values; backward recomputes every tile with
    g_ij = G_i (p_ij - w_ij), G_i the gradient reaching row i. Inputs: the (normalised) anchors and keys in
    the input dtype, the temperature tensor or None, the spec."""

    @staticmethod
    def forward(ctx, anchors, keys, tau_tensor, spec):
        inv_tau = _inv_tau(spec, tau_tensor)
        pos_count = spec.pos_count()
        norm = launch_norm(spec, anchors, keys)
        factors = _target_factors(spec, norm, pos_count)
        lse, wsum = launch_stats(spec, anchors, keys, inv_tau, factors)
        rows = torch.where(pos_count > 0, lse - wsum, 0.0)
        ctx.save_for_backward(anchors, keys, inv_tau, factors, lse, pos_count)
        ctx.spec, ctx.same = spec, anchors is keys
        ctx.tau_dtype = tau_tensor.dtype if tau_tensor is not None else None
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        anchors, keys, inv_tau, factors, lse, pos_count = ctx.saved_tensors
        spec, need = ctx.spec, ctx.needs_input_grad
        coef = torch.where(pos_count > 0, grad_rows.to(lse.dtype), 0.0)
        need_q, need_k = need[0] or (ctx.same and need[1]), need[1] or (ctx.same and need[0])
        dq, dk, gl = launch_grads(spec, anchors, keys, inv_tau, factors, lse, coef, need_dq=need_q, need_dk=need_k,
                                  logit_sums=need[2])
        grad_q = grad_k = grad_tau = None
        if ctx.same:
            grad_q = (dq + dk).to(anchors.dtype)
        else:
            grad_q = dq.to(anchors.dtype) if need[0] else None
            grad_k = dk.to(keys.dtype) if need[1] else None
        if need[2]:  # l = q.k / tau: dL/dtau = sum_ij g_ij (-l_ij / tau) = -(1/tau^2) sum_i coef_i GL_i
            grad_tau = (-(inv_tau[0] ** 2) * (coef * gl).sum()).to(ctx.tau_dtype)
        return grad_q, grad_k, grad_tau, None


def loss(spec) -> torch.Tensor:
    """The spec's result (its reduction and weights) on the Triton kernels, one process."""
    tau = spec.temperature if isinstance(spec.temperature, torch.Tensor) else None
    anchors, keys = spec.normalized_inputs()
    if spec.normalize:  # normalised in fp32 by torch ops (autograd chains through them), fed back in the input dtype
        keys = keys.to(spec.keys.dtype)
        anchors = keys if spec.anchors_are_keys else anchors.to(spec.anchors.dtype)
    rows = SoftTritonRows.apply(anchors, keys, tau, spec)
    return reduce_rows(spec, rows, spec.pos_count() > 0)


# ----------------------------------------------------------------------------- ahead-of-time check (no GPU)

def aot_reports(arch: int, dtype: str, dim: int, kind: str = "teacher", width: int = 0):
    """Each shipped config of the four kernels compiled for sm_<arch> as a real launch would be (aot.py's
    binder-faithful path), with ptxas's registers and spills and the matrix instruction used; ``width``: the
    side rows' (0: the teacher is the keys, width D). ``python -m fused_contrastive.triton_kernels.soft
    80:bfloat16:128:teacher 90:bfloat16:512:graph:10``."""
    from fused_contrastive import soft_losses
    from fused_contrastive.spec import SoftTarget
    from fused_contrastive.triton_kernels import aot

    n = aot.EXAMPLE_ROWS
    width = width or dim
    q = torch.empty((n, dim), dtype=getattr(torch, dtype))
    queue = torch.empty((n, dim), dtype=q.dtype)  # SCE / CoMatch with a queue (bank): keys [2n, D]
    side = torch.empty((2 * n, width), dtype=torch.float32)
    target = SoftTarget(kind, side[:n], side, lam=0.5, tau_t=0.1, threshold=0.5)
    spec = soft_losses._soft_spec(q, torch.empty_like(q), queue, 0.1, False, target)
    args = _args(spec, spec.anchors, spec.keys)
    rows = torch.empty(3 * n, dtype=torch.float32)
    grads = torch.empty(spec.keys.shape, dtype=torch.float32)
    one = torch.zeros(1, dtype=torch.float32)
    norm_args = {k: v for k, v in args.items() if k not in _FEATURE_ARGS}
    row = dict(INV_TAU=one, ROW=rows, LSE=rows, COEF=rows, G_LOG2=one)
    extra = {"norm": dict(norm_args, NORM=rows),
             "fwd": dict(args, INV_TAU=one, ROW=rows, LSE=rows, WSUM=rows),
             "bwd_dq": dict(args, **row, DQ=grads, GL=one, stride_dqm=dim, TAU_GRAD=False),
             "bwd_dk": dict(args, **row, DK=grads, stride_dkm=dim)}
    kernels = {"norm": _soft_norm_kernel, "fwd": _soft_fwd_kernel, "bwd_dq": _soft_bwd_dq_kernel,
               "bwd_dk": _soft_bwd_dk_kernel}
    out = []
    for name, kernel in kernels.items():
        family = "norm" if name == "norm" else "tile"
        for shape in tile_shapes(family, q.element_size(), args["BLOCK_D"], 1 << 15):
            out.append((name, shape, *aot.shape_report(kernel, arch, extra[name], _config(shape))))
    return out


if __name__ == "__main__":
    import sys

    flawed = 0
    for case in sys.argv[1:] or ["80:bfloat16:128:teacher", "90:bfloat16:128:graph:10"]:
        arch, dtype, dim, *rest = case.split(":")
        kind = rest[0] if rest else "teacher"
        width = int(rest[1]) if len(rest) > 1 else 0
        for name, shape, regs, spills, mma in aot_reports(int(arch), dtype, int(dim), kind, width):
            bad = spills > 0 or mma == "fma (no tensor cores)"
            flawed += bad
            print(f"soft {name:<6} sm_{arch} {dtype:<8} D={dim:<3} {kind:<7} S={width or dim:<3} {shape}  regs {regs:>3}  "
                  f"spills {spills:>5} B  {mma}" + ("   <-- spills or no tensor cores" if bad else ""), flush=True)
    print(f"{flawed} flawed configs")
    sys.exit(1 if flawed else 0)
