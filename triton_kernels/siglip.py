"""SigLIP's sigmoid loss as fused Triton kernels.

Read top to bottom: the tile helpers and three kernels (forward: per-row loss sums; dX row-parallel, which
also gives the scale's and bias's per-row sums; dY column-parallel), then their launchers. The
autograd.Function, the other backends and the public API are in ``fused_contrastive.siglip``.

For the logits ``t_ij = s x_i . y_j + b`` and signs ``z_ij`` (+1 on positives, -1 elsewhere) a row's loss is
``L_i = sum_j softplus(-z_ij t_ij)``. Unlike the softmax losses there is no normaliser: no running max, no
LSE, each tile's contribution is a plain sum. The backward recomputes each tile and uses
``h_ij = dsoftplus(-z t)/dt = -z_ij sigmoid(-z_ij t_ij)``, which lies in [-1, 1] whatever t is:
``dX_i = s c_i sum_j h_ij y_j``, ``dY_j = s sum_i c_i h_ij x_i``, ``ds = sum_ij c_i h_ij x_i . y_j``,
``db = sum_ij c_i h_ij``, with c_i = dLoss/dL_i. Nothing of size Na x M is ever written, and no atomics:
dX and the row sums come from a row-parallel pass, dY from a column-parallel one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_contrastive.triton_kernels.supcon import (INT32_LIMIT, INTERPRETER, rows_why_not, _autotune_options, _config,
                                                     _device_guard, _interpreting, _load_rows, _precision, _row_offset)

# ----------------------------------------------------------------------------- tile helpers


@triton.jit
def _softplus(u):
    """log(1 + e^u) to full relative precision at any u: max(u, 0) + log1p(e^{-|u|}), the log1p formed from
    a plain log as log(w) * e / (w - 1) with w = 1 + e (exact where w rounds; e itself where w == 1), so a
    confidently right pair (u = -20: 2e-9) keeps its digits instead of rounding to 0 in fp32."""
    e = tl.exp(-tl.abs(u))
    w = 1.0 + e
    d = w - 1.0
    log1p = tl.where(d == 0.0, e, tl.log(w) * (e / tl.where(d == 0.0, 1.0, d)))
    return tl.maximum(u, 0.0) + log1p


@triton.jit
def _sigmoid(v):
    """1 / (1 + e^-v) without overflow: e^-|v| is at most 1."""
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _signs(rows, cols, row_ok, col_ok, AL, KL, MASK, stride_mm, pos_offset, POSITIVES: tl.constexpr,
           OFFSETS_64: tl.constexpr):
    """z_ij for one tile: +1 on positives, -1 elsewhere. POSITIVES: 0 none (negative_only), 1 the diagonal
    shifted by pos_offset (j == i + pos_offset: this rank's texts among the global ones), 2 equal labels,
    3 a dense [Na, M] mask (nonzero: positive)."""
    if POSITIVES == 1:
        pos = cols[None, :] == (rows + pos_offset)[:, None]
    elif POSITIVES == 2:
        anchor = tl.load(AL + rows, mask=row_ok, other=-1)
        key = tl.load(KL + cols, mask=col_ok, other=-2)
        pos = anchor[:, None] == key[None, :]
    elif POSITIVES == 3:
        m = tl.load(MASK + _row_offset(rows, stride_mm, OFFSETS_64)[:, None] + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        pos = m != 0
    else:
        pos = cols[None, :] < 0  # all False
    return tl.where(pos, 1.0, -1.0)


@triton.jit
def _tile(x, y, s, b, rows, cols, row_ok, col_ok, AL, KL, MASK, stride_mm, pos_offset, POSITIVES: tl.constexpr,
          PRECISION: tl.constexpr, ACC: tl.constexpr, OFFSETS_64: tl.constexpr):
    """(x . y, t = s x . y + b, z) of one tile, the product accumulated in ACC: what all three kernels
    recompute for every (row block, column block)."""
    dot = tl.dot(x, tl.trans(y), input_precision=PRECISION, out_dtype=ACC)
    z = _signs(rows, cols, row_ok, col_ok, AL, KL, MASK, stride_mm, pos_offset, POSITIVES, OFFSETS_64)
    return dot, dot * s + b, z


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _siglip_fwd_kernel(X, Y, SCALE, BIAS, AL, KL, MASK, LOSS, Na, M, D, pos_offset,
                       stride_xm, stride_xd, stride_ym, stride_yd, stride_mm,
                       N_BUCKET,  # autotuning key only
                       POSITIVES: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                       DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """LOSS[i] = sum_j softplus(-z_ij t_ij) over all M texts, one block of image rows per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Na
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rows(X, rows, row_ok, offs_d, D, stride_xm, stride_xd, DOT_IN_FP32, OFFSETS_64, True)
    s = tl.load(SCALE)
    b = tl.load(BIAS)
    total = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        y = _load_rows(Y, cols, col_ok, offs_d, D, stride_ym, stride_yd, DOT_IN_FP32, OFFSETS_64, True)
        _, t, z = _tile(x, y, s, b, rows, cols, row_ok, col_ok, AL, KL, MASK, stride_mm, pos_offset, POSITIVES,
                        PRECISION, ACC, OFFSETS_64)
        total += tl.sum(tl.where(col_ok[None, :], _softplus(-z * t), 0.0), 1)
    tl.store(LOSS + rows, total, mask=row_ok)


@triton.jit
def _siglip_bwd_dx_kernel(X, Y, SCALE, BIAS, AL, KL, MASK, COEF, DX, GDOT, GSUM, Na, M, D, pos_offset,
                          stride_xm, stride_xd, stride_ym, stride_yd, stride_mm, stride_dxm,
                          N_BUCKET,
                          POSITIVES: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                          DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dX_i = s c_i sum_j h_ij y_j, and per row c_i sum_j h_ij x_i . y_j (GDOT) and c_i sum_j h_ij (GSUM).
    The tile h (in [-1, 1]) meets the 16-bit texts in the product; c_i, whose size (1 / B) would fall into
    fp16's subnormals, multiplies the fp32 result afterwards."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Na
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rows(X, rows, row_ok, offs_d, D, stride_xm, stride_xd, DOT_IN_FP32, OFFSETS_64, True)
    s = tl.load(SCALE)
    b = tl.load(BIAS)
    dx = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    gdot = tl.zeros([BLOCK_M], ACC)
    gsum = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        y = _load_rows(Y, cols, col_ok, offs_d, D, stride_ym, stride_yd, DOT_IN_FP32, OFFSETS_64, True)
        dot, t, z = _tile(x, y, s, b, rows, cols, row_ok, col_ok, AL, KL, MASK, stride_mm, pos_offset, POSITIVES,
                          PRECISION, ACC, OFFSETS_64)
        h = tl.where(col_ok[None, :], -z * _sigmoid(-z * t), 0.0)
        gdot += tl.sum(h * dot, 1)
        gsum += tl.sum(h, 1)
        dx += tl.dot(h.to(y.dtype), y, input_precision=PRECISION, out_dtype=ACC)
    c = tl.load(COEF + rows, mask=row_ok, other=0.0)
    d_ok = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DX + _row_offset(rows, stride_dxm, OFFSETS_64)[:, None] + offs_d[None, :], dx * (s * c)[:, None],
             mask=d_ok)
    tl.store(GDOT + rows, gdot * c, mask=row_ok)
    tl.store(GSUM + rows, gsum * c, mask=row_ok)


@triton.jit
def _siglip_bwd_dy_kernel(X, XC, Y, SCALE, BIAS, AL, KL, MASK, C_MAX, DY, Na, M, D, pos_offset,
                          stride_xm, stride_xd, stride_ym, stride_yd, stride_mm, stride_dym,
                          N_BUCKET,
                          POSITIVES: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                          DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dY_j = s sum_i c_i h_ij x_i, one block of text columns per program. XC holds x_i c_i / max|c| (the
    launcher's, in the input dtype: at most |x_i|, so fp16 neither overflows nor underflows it for the
    typical row); C_MAX multiplies the fp32 result back."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    offs_d = tl.arange(0, BLOCK_D)
    y = _load_rows(Y, cols, col_ok, offs_d, D, stride_ym, stride_yd, DOT_IN_FP32, OFFSETS_64, True)
    s = tl.load(SCALE)
    b = tl.load(BIAS)
    dy = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start in range(0, Na, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Na
        x = _load_rows(X, rows, row_ok, offs_d, D, stride_xm, stride_xd, DOT_IN_FP32, OFFSETS_64, True)
        xc = _load_rows(XC, rows, row_ok, offs_d, D, stride_xm, stride_xd, DOT_IN_FP32, OFFSETS_64, True)
        _, t, z = _tile(x, y, s, b, rows, cols, row_ok, col_ok, AL, KL, MASK, stride_mm, pos_offset, POSITIVES,
                        PRECISION, ACC, OFFSETS_64)
        h = tl.where(row_ok[:, None], -z * _sigmoid(-z * t), 0.0)
        dy += tl.dot(tl.trans(h.to(xc.dtype)), xc, input_precision=PRECISION, out_dtype=ACC)
    d_ok = col_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DY + _row_offset(cols, stride_dym, OFFSETS_64)[:, None] + offs_d[None, :], dy * (s * tl.load(C_MAX)),
             mask=d_ok)


# ----------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by input width and BLOCK_D bucket: supcon's backward table
# (its kernels hold the same [BLOCK, BLOCK_D] fp32 accumulator; this file's forward holds less, so the
# table is conservative for it); checked for spills with aot_reports on sm_80/sm_90 (bench/results).
TILE_CONFIGS = {
    2: {64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
        128: [(128, 64, 8, 3), (64, 32, 4, 4)],
        256: [(64, 32, 8, 3), (16, 32, 4, 2)],
        512: [(32, 32, 8, 2), (16, 32, 8, 2)]},
    4: {64: [(16, 32, 4, 2)]},
}
TUNING_KEY = ["D", "N_BUCKET", "POSITIVES", "PRECISION"]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if _interpreting():  # one config: launched directly, never benchmarked
        return [_config(INTERPRETER)]
    shapes = TILE_CONFIGS[args["Y"].element_size()][max(64, args["BLOCK_D"])]
    if max(args["Na"], args["M"]) <= 64:
        shapes = shapes[-1:]
    return [_config(sh) for sh in shapes]


class TunedKernel:
    """``kernel[grid](**args)`` autotuned over the pruned configs, under the inputs' device; one surviving
    config is launched directly (supcon.TunedKernel's rule). ``prune`` and ``key``: another kernel file's
    pruning and tuning key over the same tile table (FairKL's)."""

    def __init__(self, kernel, prune=None, key=None):
        self.kernel, self.prune = kernel, prune or _prune
        self.configs = [_config(sh) for sh in sorted({sh for t in TILE_CONFIGS.values() for v in t.values() for sh in v})]
        self.tuner = triton.autotune(configs=self.configs, key=key or TUNING_KEY,
                                     prune_configs_by={"early_config_prune": self.prune}, **_autotune_options())(kernel)

    def __getitem__(self, grid):
        def launch(**args):
            with _device_guard(args["Y"].device):
                configs = self.prune(self.configs, {}, **args)
                if len(configs) == 1:
                    return self.kernel[grid](**args, **configs[0].all_kwargs())
                return self.tuner[grid](**args)
        return launch


siglip_fwd = TunedKernel(_siglip_fwd_kernel)
siglip_bwd_dx = TunedKernel(_siglip_bwd_dx_kernel)
siglip_bwd_dy = TunedKernel(_siglip_bwd_dy_kernel)

POSITIVE_CODES = {"none": 0, "diagonal": 1, "labels": 2, "mask": 3}


def why_not(spec) -> str | None:
    """Why these kernels cannot run the SigLIP spec (None: they can)."""
    return rows_why_not(spec.images.dtype, spec.images.device, spec.images.shape[1])


def _offsets_64(spec) -> bool:
    X, Y, mask = spec.images, spec.texts, spec.mask
    span = max(X.shape[0], Y.shape[0]) * max(X.stride(0), Y.stride(0), X.shape[1])
    if mask is not None:
        span = max(span, mask.shape[0] * max(mask.stride(0), mask.shape[1]))
    return span >= INT32_LIMIT


def _args(spec):
    X, Y = spec.images, spec.texts
    acc = spec.accum_dtype
    dummy = torch.zeros(1, dtype=torch.int32, device=Y.device)
    labels = spec.labels
    mask = spec.mask
    assert mask is None or mask.shape[1] <= 1 or mask.stride(1) == 1, "the kernels read mask columns with stride 1"
    dim = Y.shape[1]
    return dict(
        X=X, Y=Y, SCALE=spec.scale_tensor(), BIAS=spec.bias_tensor(),
        AL=labels[0] if labels is not None else dummy, KL=labels[1] if labels is not None else dummy,
        MASK=mask if mask is not None else dummy, Na=X.shape[0], M=Y.shape[0], D=dim,
        pos_offset=spec.pos_offset if spec.pos_offset is not None else 0,
        stride_xm=X.stride(0), stride_xd=X.stride(1), stride_ym=Y.stride(0), stride_yd=Y.stride(1),
        stride_mm=mask.stride(0) if mask is not None else 0,
        N_BUCKET=triton.next_power_of_2(max(X.shape[0], Y.shape[0])),
        POSITIVES=POSITIVE_CODES[spec.positives], PRECISION=_precision(Y.dtype),
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        DOT_IN_FP32=_interpreting() and Y.dtype == torch.bfloat16, OFFSETS_64=_offsets_64(spec),
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )


def row_losses(spec) -> torch.Tensor:
    """L_i per image row [Na] in the accumulation dtype."""
    args = _args(spec)
    loss = torch.empty(spec.images.shape[0], dtype=spec.accum_dtype, device=spec.images.device)
    grid = lambda meta: (triton.cdiv(args["Na"], meta["BLOCK_M"]),)  # noqa: E731
    siglip_fwd[grid](LOSS=loss, **args)
    return loss


def grads(spec, coef: torch.Tensor):
    """(dX, dY, ds, db) of sum_i coef_i L_i, in the accumulation dtype (a ring adds shards' dY in it)."""
    args = _args(spec)
    X, Y = spec.images, spec.texts
    acc = spec.accum_dtype
    coef = coef.to(acc).contiguous()
    dx = torch.empty(X.shape, dtype=acc, device=X.device)
    gdot = torch.empty(X.shape[0], dtype=acc, device=X.device)
    gsum = torch.empty_like(gdot)
    grid = lambda meta: (triton.cdiv(args["Na"], meta["BLOCK_M"]),)  # noqa: E731
    siglip_bwd_dx[grid](COEF=coef, DX=dx, GDOT=gdot, GSUM=gsum, stride_dxm=dx.stride(0), **args)
    c_max = coef.abs().amax().reshape(1) if coef.numel() else torch.ones(1, dtype=acc, device=X.device)
    c_max = torch.where(c_max > 0, c_max, 1.0)
    # X and XC share one stride pair in the kernel: both contiguous (the spec's rows are).
    assert X.is_contiguous(), "images must be contiguous"
    xc = (X.to(acc) * (coef / c_max)[:, None]).to(X.dtype).contiguous()
    dy = torch.empty(Y.shape, dtype=acc, device=Y.device)
    grid = lambda meta: (triton.cdiv(args["M"], meta["BLOCK_N"]),)  # noqa: E731
    siglip_bwd_dy[grid](XC=xc, C_MAX=c_max.to(acc), DY=dy, stride_dym=dy.stride(0), **args)
    return dx, dy, gdot.sum(), gsum.sum()


# ----------------------------------------------------------------------------- ahead-of-time check (no GPU)

def aot_reports(arch: int, dtype: str, dim: int, positives: str = "diagonal"):
    """Each shipped config of the three kernels compiled for sm_<arch> as a real launch would be (aot.py's
    binder-faithful path), with ptxas's registers and spills and the matrix instruction used:
    ``python -m fused_contrastive.triton_kernels.siglip 80:bfloat16:512 90:bfloat16:128``."""
    from fused_contrastive.siglip import SigLipSpec
    from fused_contrastive.triton_kernels import aot

    n = aot.EXAMPLE_ROWS
    feats = torch.empty((n, dim), dtype=getattr(torch, dtype))
    ids = torch.arange(n, dtype=torch.int64)
    spec = SigLipSpec(feats, feats, torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.float32), positives,
                      0, (ids, ids) if positives == "labels" else None,
                      torch.zeros((n, n), dtype=torch.uint8) if positives == "mask" else None)
    args = _args(spec)
    rows = torch.empty(n, dtype=torch.float32)
    extra = {"fwd": dict(LOSS=rows),
             "bwd_dx": dict(COEF=rows, DX=torch.empty((n, dim)), GDOT=rows, GSUM=rows, stride_dxm=dim),
             "bwd_dy": dict(XC=feats, C_MAX=rows, DY=torch.empty((n, dim)), stride_dym=dim)}
    kernels = {"fwd": _siglip_fwd_kernel, "bwd_dx": _siglip_bwd_dx_kernel, "bwd_dy": _siglip_bwd_dy_kernel}
    shapes = TILE_CONFIGS[feats.element_size()][max(64, args["BLOCK_D"])]
    out = []
    for name, kernel in kernels.items():
        for shape in shapes:
            out.append((name, shape, *aot.shape_report(kernel, arch, {**args, **extra[name]}, _config(shape))))
    return out


if __name__ == "__main__":
    import sys

    flawed = 0
    for case in sys.argv[1:] or ["80:bfloat16:512", "90:bfloat16:512", "80:bfloat16:128", "90:bfloat16:128"]:
        arch, dtype, dim, *rest = case.split(":")
        for name, shape, regs, spills, mma in aot_reports(int(arch), dtype, int(dim), *rest):
            bad = spills > 0 or mma == "fma (no tensor cores)"
            flawed += bad
            print(f"siglip {name:<6} sm_{arch} {dtype} D={dim} {rest[0] if rest else 'diagonal':<8} {shape}  regs {regs:>3}  "
                  f"spills {spills:>5} B  {mma}" + ("   <-- spills or no tensor cores" if bad else ""), flush=True)
    print(f"{flawed} flawed configs")
    sys.exit(1 if flawed else 0)
