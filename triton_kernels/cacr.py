"""CACR's repulsion tiles as Triton kernels: squared distances from the Gram product, per-row softmax
statistics, and the gradient tiles.

For anchor rows x_i against keys y_j, ``d_ij = |x_i|^2 + |y_j|^2 - 2 x_i . y_j`` (clamped at 0, the rounding
of a near-duplicate pair), each row's own sample (``DIAG[i]``, -1: not among these keys) left out. The
statistics of one coefficient a (a tensor in the accumulation dtype, so float64 runs exactly):
``m_i = max_j a d_ij``, ``s_i = sum_j e^{a d_ij - m_i}``, ``ws_i = sum_j d_ij e^{a d_ij - m_i}``: the softmax
weights w_ij = softmax_j(a d_ij) and the weighted mean distance ws_i / s_i (a = 0: the plain mean), or an LSE
of a d (m_i + log s_i) for the RBF cost.

Every form of the loss differentiates to a tile ``G_ij = e^{a0 d_ij - m0_i} (c0_i + e0_i d_ij)
[+ e^{a1 d_ij - m1_i} c1_i]`` (per-row coefficients the caller forms from the merged statistics and the
upstream gradient; the exponents are <= 0), and then ``dX_i = 2 (x_i sum_j G_ij - sum_j G_ij y_j)`` (a
row-parallel pass) and ``dY_j = 2 (y_j sum_i G_ij - sum_i G_ij x_i)`` (a column-parallel one): no atomics,
nothing of size N x N in memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_contrastive.triton_kernels.renyicl import (TunedKernel, _row_scales, aot_main, aot_table, common_args,
                                                      hat)
from fused_contrastive.triton_kernels.supcon import _load_rows, _row_offset


@triton.jit
def _sq_dist_tile(x, xs, xn, Y, YS, YN, cols, col_ok, offs_d, D, stride_ym, stride_yd, SCALED: tl.constexpr,
                  PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr):
    """(key rows, their scales, d_ij) of one key tile; the rows seen are xs x and ys y when SCALED."""
    y = _load_rows(Y, cols, col_ok, offs_d, D, stride_ym, stride_yd, DOT_IN_FP32, OFFSETS_64, True)
    yn = tl.load(YN + cols, mask=col_ok, other=0.0)
    ys = _row_scales(YS, cols, col_ok, SCALED)
    dot = tl.dot(x, tl.trans(y), input_precision=PRECISION, out_dtype=ACC)
    if SCALED:
        dot = dot * xs[:, None] * ys[None, :]
    return y, ys, tl.maximum(xn[:, None] + yn[None, :] - 2.0 * dot, 0.0)


@triton.jit
def _cacr_stats_kernel(X, Y, XS, YS, XN, YN, DIAG, PARAMS, MAX, SUM, WSUM, R, M, D,
                       stride_xm, stride_xd, stride_ym, stride_yd,
                       N_BUCKET,
                       SCALED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                       DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """(m_i, s_i, ws_i) of a d_ij over the keys j != DIAG[i], one block of anchor rows (PARAMS: a)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rows(X, rows, row_ok, offs_d, D, stride_xm, stride_xd, DOT_IN_FP32, OFFSETS_64, True)
    xn = tl.load(XN + rows, mask=row_ok, other=0.0)
    xs = _row_scales(XS, rows, row_ok, SCALED)
    diag = tl.load(DIAG + rows, mask=row_ok, other=-1)
    a = tl.load(PARAMS)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], ACC)
    ws = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        _, _, d = _sq_dist_tile(x, xs, xn, Y, YS, YN, cols, col_ok, offs_d, D, stride_ym, stride_yd, SCALED,
                                PRECISION, ACC, DOT_IN_FP32, OFFSETS_64)
        off = col_ok[None, :] & (cols[None, :] != diag[:, None])
        g = tl.where(off, a * d, float("-inf"))
        m_new = tl.maximum(m, tl.max(g, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - shift)
        e = tl.exp(g - shift[:, None])
        s = s * rescale + tl.sum(e, 1)
        ws = ws * rescale + tl.sum(tl.where(off, d, 0.0) * e, 1)
        m = m_new
    tl.store(MAX + rows, m, mask=row_ok)
    tl.store(SUM + rows, s, mask=row_ok)
    tl.store(WSUM + rows, ws, mask=row_ok)


@triton.jit
def _grad_tile(d, off, rows, row_ok, M0, C0, E0, M1, C1, a0, a1, TWO: tl.constexpr):
    m0 = tl.load(M0 + rows, mask=row_ok, other=0.0)
    c0 = tl.load(C0 + rows, mask=row_ok, other=0.0)
    e0 = tl.load(E0 + rows, mask=row_ok, other=0.0)
    g = tl.exp(a0 * d - m0[:, None]) * (c0[:, None] + e0[:, None] * d)
    if TWO:
        m1 = tl.load(M1 + rows, mask=row_ok, other=0.0)
        c1 = tl.load(C1 + rows, mask=row_ok, other=0.0)
        g += tl.exp(a1 * d - m1[:, None]) * c1[:, None]
    return tl.where(off, g, 0.0)


@triton.jit
def _cacr_bwd_dx_kernel(X, Y, XS, YS, XN, YN, DIAG, PARAMS, M0, C0, E0, M1, C1, DX, R, M, D,
                        stride_xm, stride_xd, stride_ym, stride_yd, stride_dxm,
                        N_BUCKET,
                        TWO: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                        DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dX_i = 2 (x_i sum_j G_ij - sum_j G_ij y_j) (PARAMS: a0, a1)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rows(X, rows, row_ok, offs_d, D, stride_xm, stride_xd, DOT_IN_FP32, OFFSETS_64, True)
    xn = tl.load(XN + rows, mask=row_ok, other=0.0)
    xs = _row_scales(XS, rows, row_ok, SCALED)
    diag = tl.load(DIAG + rows, mask=row_ok, other=-1)
    a0 = tl.load(PARAMS)
    a1 = tl.load(PARAMS + 1)
    gy = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    gsum = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        y, ys, d = _sq_dist_tile(x, xs, xn, Y, YS, YN, cols, col_ok, offs_d, D, stride_ym, stride_yd, SCALED,
                                 PRECISION, ACC, DOT_IN_FP32, OFFSETS_64)
        off = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != diag[:, None])
        g = _grad_tile(d, off, rows, row_ok, M0, C0, E0, M1, C1, a0, a1, TWO)
        gsum += tl.sum(g, 1)
        if SCALED:  # sum_j G_ij (ys_j y_j)
            g = g * ys[None, :]
        gy += tl.dot(g.to(y.dtype), y, input_precision=PRECISION, out_dtype=ACC)
    xa = x.to(ACC)
    if SCALED:
        xa = xa * xs[:, None]
    dx = 2.0 * (xa * gsum[:, None] - gy)
    d_ok = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DX + _row_offset(rows, stride_dxm, OFFSETS_64)[:, None] + offs_d[None, :], dx, mask=d_ok)


@triton.jit
def _cacr_bwd_dy_kernel(X, Y, XS, YS, XN, YN, DIAG, PARAMS, M0, C0, E0, M1, C1, DY, R, M, D,
                        stride_xm, stride_xd, stride_ym, stride_yd, stride_dym,
                        N_BUCKET,
                        TWO: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                        DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dY_j = 2 (y_j sum_i G_ij - sum_i G_ij x_i), one block of key columns per program."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    offs_d = tl.arange(0, BLOCK_D)
    y = _load_rows(Y, cols, col_ok, offs_d, D, stride_ym, stride_yd, DOT_IN_FP32, OFFSETS_64, True)
    yn = tl.load(YN + cols, mask=col_ok, other=0.0)
    ys = _row_scales(YS, cols, col_ok, SCALED)
    a0 = tl.load(PARAMS)
    a1 = tl.load(PARAMS + 1)
    gx = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    gsum = tl.zeros([BLOCK_N], ACC)
    for start in range(0, R, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        x = _load_rows(X, rows, row_ok, offs_d, D, stride_xm, stride_xd, DOT_IN_FP32, OFFSETS_64, True)
        xn = tl.load(XN + rows, mask=row_ok, other=0.0)
        diag = tl.load(DIAG + rows, mask=row_ok, other=-1)
        dot = tl.dot(x, tl.trans(y), input_precision=PRECISION, out_dtype=ACC)
        if SCALED:
            xs = tl.load(XS + rows, mask=row_ok, other=0.0)
            dot = dot * xs[:, None] * ys[None, :]
        d = tl.maximum(xn[:, None] + yn[None, :] - 2.0 * dot, 0.0)
        off = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != diag[:, None])
        g = _grad_tile(d, off, rows, row_ok, M0, C0, E0, M1, C1, a0, a1, TWO)
        gsum += tl.sum(g, 0)
        if SCALED:
            g = g * xs[:, None]
        gx += tl.dot(tl.trans(g.to(x.dtype)), x, input_precision=PRECISION, out_dtype=ACC)
    ya = y.to(ACC)
    if SCALED:
        ya = ya * ys[:, None]
    dy = 2.0 * (ya * gsum[:, None] - gx)
    d_ok = col_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DY + _row_offset(cols, stride_dym, OFFSETS_64)[:, None] + offs_d[None, :], dy, mask=d_ok)


cacr_stats_kernel = TunedKernel(_cacr_stats_kernel, "Y", "R", "M")
# dX holds a [BLOCK_M, BLOCK_D] fp32 accumulator, the anchor rows and the per-row coefficients of two
# exponential terms: its 128-row tile at D = 128 spills 192 bytes on sm_80, the 64-row one at D = 256 40 bytes
# on sm_90 (aot_reports, Triton 3.9).
cacr_dx_kernel = TunedKernel(_cacr_bwd_dx_kernel, "Y", "R", "M",
                             drop={80: {128: [(128, 64, 8, 3)]}, 90: {256: [(64, 32, 8, 3)]}})
cacr_dy_kernel = TunedKernel(_cacr_bwd_dy_kernel, "Y", "R", "M")


def _norms(Z, S, acc):
    z = hat(Z, S, acc)
    return (z * z).sum(1).contiguous()


def _scales(XS, YS, acc, device) -> dict:
    dummy = torch.zeros(1, dtype=acc, device=device)
    return dict(XS=dummy if XS is None else XS.to(acc).contiguous(), YS=dummy if YS is None else YS.to(acc).contiguous(),
                SCALED=XS is not None)


def _params(acc, device, *values):
    return torch.stack([v.reshape(()).to(acc) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=acc)
                        for v in values]).to(device)


def stats(X, Y, diag, a, acc: torch.dtype, XS=None, YS=None):
    """(m, s, ws) per row of X [R, D] against Y [M, D] for the coefficient a (see the module docstring); XS / YS:
    per-row scales (both or neither: the rows are then XS x and YS y)."""
    R = X.shape[0]
    m, s, ws = (torch.empty(R, dtype=acc, device=X.device) for _ in range(3))
    if R:
        args = common_args(X, Y, acc, "X", "Y")
        grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]),)  # noqa: E731
        cacr_stats_kernel[grid](XN=_norms(X, XS, acc), YN=_norms(Y, YS, acc), **_scales(XS, YS, acc, X.device), DIAG=diag.to(torch.int32).contiguous(),
                                PARAMS=_params(acc, X.device, a), MAX=m, SUM=s, WSUM=ws, R=R, M=Y.shape[0], **args)
    return m, s, ws


def grads(X, Y, diag, terms, acc: torch.dtype, need_dx: bool = True, need_dy: bool = True, XS=None, YS=None):
    """(dX, dY) in ``acc`` for the tile G of ``terms`` = ((a0, m0, c0, e0), optional (a1, m1, c1)), the
    per-row tensors already times the upstream gradient; None where not needed."""
    R, M = X.shape[0], Y.shape[0]
    (a0, m0, c0, e0), second = terms[0], (terms[1] if len(terms) > 1 else None)
    dummy = torch.zeros(1, dtype=acc, device=X.device)
    a1, m1, c1 = second if second is not None else (0.0, dummy, dummy)
    vec = lambda t: t.to(acc).contiguous()  # noqa: E731
    launch = dict(XN=_norms(X, XS, acc), YN=_norms(Y, YS, acc), **_scales(XS, YS, acc, X.device), DIAG=diag.to(torch.int32).contiguous(),
                  PARAMS=_params(acc, X.device, a0, a1), M0=vec(m0), C0=vec(c0), E0=vec(e0), M1=vec(m1), C1=vec(c1),
                  R=R, M=M, TWO=second is not None, **common_args(X, Y, acc, "X", "Y"))
    dx = dy = None
    if need_dx:
        dx = torch.zeros(X.shape, dtype=acc, device=X.device)
        if R and M:
            grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]),)  # noqa: E731
            cacr_dx_kernel[grid](DX=dx, stride_dxm=dx.stride(0), **launch)
    if need_dy:
        dy = torch.zeros(Y.shape, dtype=acc, device=Y.device)
        if R and M:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_N"]),)  # noqa: E731
            cacr_dy_kernel[grid](DY=dy, stride_dym=dy.stride(0), **launch)
    return dx, dy


def aot_reports(arch: int, dtype: str, dim: int):
    """Each shipped config of the three kernels compiled for sm_<arch> (the RBF cost's two-term tile)."""
    from fused_contrastive.triton_kernels import aot

    n = aot.EXAMPLE_ROWS
    feats = torch.empty((n, dim), dtype=getattr(torch, dtype))
    args = common_args(feats, feats, torch.float32, "X", "Y")
    vec = torch.empty(n, dtype=torch.float32)
    grad = torch.empty((n, dim), dtype=torch.float32)
    base = dict(XN=vec, YN=vec, XS=vec, YS=vec, SCALED=True, DIAG=torch.empty(n, dtype=torch.int32), PARAMS=torch.empty(2, dtype=torch.float32),
                R=n, M=n)
    tiles = dict(M0=vec, C0=vec, E0=vec, M1=vec, C1=vec, TWO=True)
    extra = {"stats": dict(MAX=vec, SUM=vec, WSUM=vec), "bwd_dx": dict(DX=grad, stride_dxm=dim, **tiles),
             "bwd_dy": dict(DY=grad, stride_dym=dim, **tiles)}
    kernels = {"stats": cacr_stats_kernel, "bwd_dx": cacr_dx_kernel, "bwd_dy": cacr_dy_kernel}
    return aot_table(kernels, {k: {**args, **base, **v} for k, v in extra.items()}, arch, feats.element_size(),
                     args["BLOCK_D"])


if __name__ == "__main__":
    import sys

    sys.exit(aot_main("cacr", aot_reports, sys.argv[1:]))
