"""FairKL's per-row moments and their gradient as Triton kernels.

Two row-parallel kernels over tiles of anchor rows x key columns (the autograd and the other backends are in
``fused_contrastive.fairkl``). For ``d_ij = q_i . k_j`` and the pair's group g (0 pa, 1 pc, 2 na, 3 nc:
2 x [labels differ] + [bias labels differ]):

- moments: ``OUT[i, g] = sum_j d_ij`` and ``OUT[i, 4 + g] = sum_j d_ij^2`` over the keys of group g, eight
  running row sums, no exp, no normaliser;
- gradient: ``DQ[i] = sum_j (a_g + 2 b_g d_ij) k_j`` for per-group coefficients ``a = COEF[0:4]``,
  ``b = COEF[4:8]``. The regulariser's pair matrix is symmetric, so this row side is the whole gradient (the
  caller doubles it): no column-parallel kernel and no atomics.

The coefficients are about 1 / N^2 (the group means divide by the pair counts): in a 16-bit product such a
tile would fall into fp16's subnormals. The launcher divides them by a bound on |a + 2 b d| (Cauchy-Schwarz
on the rows' norms), so the tile entering the product lies in [-1, 1], and the kernel multiplies the fp32
result back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_contrastive.triton_kernels.siglip import TILE_CONFIGS as SIGLIP_TILE_CONFIGS, TunedKernel
from fused_contrastive.triton_kernels.supcon import (INT32_LIMIT, INTERPRETER, rows_why_not, _config, _interpreting,
                                                     _load_rows, _precision, _row_offset)


@triton.jit
def _pair_groups(rows, cols, row_ok, col_ok, XY, XB, YY, YB):
    """(same label, same bias label) of a tile's pairs."""
    ry = tl.load(XY + rows, mask=row_ok, other=-1)
    rb = tl.load(XB + rows, mask=row_ok, other=-1)
    cy = tl.load(YY + cols, mask=col_ok, other=-2)
    cb = tl.load(YB + cols, mask=col_ok, other=-2)
    return ry[:, None] == cy[None, :], rb[:, None] == cb[None, :]


@triton.jit
def _fairkl_moments_kernel(X, Y, XY, XB, YY, YB, OUT, Na, M, D,
                           stride_xm, stride_xd, stride_ym, stride_yd,
                           N_BUCKET,  # autotuning key only
                           PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                           OFFSETS_64: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[i, 0:4] = per-group sums of d_ij, OUT[i, 4:8] of d_ij^2, one block of rows per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Na
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rows(X, rows, row_ok, offs_d, D, stride_xm, stride_xd, DOT_IN_FP32, OFFSETS_64, True)
    s_pa = tl.zeros([BLOCK_M], ACC)
    s_pc = tl.zeros([BLOCK_M], ACC)
    s_na = tl.zeros([BLOCK_M], ACC)
    s_nc = tl.zeros([BLOCK_M], ACC)
    q_pa = tl.zeros([BLOCK_M], ACC)
    q_pc = tl.zeros([BLOCK_M], ACC)
    q_na = tl.zeros([BLOCK_M], ACC)
    q_nc = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        y = _load_rows(Y, cols, col_ok, offs_d, D, stride_ym, stride_yd, DOT_IN_FP32, OFFSETS_64, True)
        d = tl.dot(x, tl.trans(y), input_precision=PRECISION, out_dtype=ACC)
        d = tl.where(col_ok[None, :], d, 0.0)  # keys past M add nothing, whatever group they seem to be in
        d2 = d * d
        same_y, same_b = _pair_groups(rows, cols, row_ok, col_ok, XY, XB, YY, YB)
        s_pa += tl.sum(tl.where(same_y & same_b, d, 0.0), 1)
        s_pc += tl.sum(tl.where(same_y & ~same_b, d, 0.0), 1)
        s_na += tl.sum(tl.where(~same_y & same_b, d, 0.0), 1)
        s_nc += tl.sum(tl.where(~same_y & ~same_b, d, 0.0), 1)
        q_pa += tl.sum(tl.where(same_y & same_b, d2, 0.0), 1)
        q_pc += tl.sum(tl.where(same_y & ~same_b, d2, 0.0), 1)
        q_na += tl.sum(tl.where(~same_y & same_b, d2, 0.0), 1)
        q_nc += tl.sum(tl.where(~same_y & ~same_b, d2, 0.0), 1)
    out = OUT + _row_offset(rows, 8, OFFSETS_64)
    tl.store(out + 0, s_pa, mask=row_ok)
    tl.store(out + 1, s_pc, mask=row_ok)
    tl.store(out + 2, s_na, mask=row_ok)
    tl.store(out + 3, s_nc, mask=row_ok)
    tl.store(out + 4, q_pa, mask=row_ok)
    tl.store(out + 5, q_pc, mask=row_ok)
    tl.store(out + 6, q_na, mask=row_ok)
    tl.store(out + 7, q_nc, mask=row_ok)


@triton.jit
def _by_group(same_y, same_b, c_pa, c_pc, c_na, c_nc):
    return tl.where(same_y, tl.where(same_b, c_pa, c_pc), tl.where(same_b, c_na, c_nc))


@triton.jit
def _fairkl_grad_kernel(X, Y, XY, XB, YY, YB, COEF, SCALE, DX, Na, M, D,
                        stride_xm, stride_xd, stride_ym, stride_yd, stride_dxm,
                        N_BUCKET,
                        PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                        OFFSETS_64: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """DX[i] = SCALE * sum_j (a_g + 2 b_g d_ij) y_j, with COEF = (a, b) / SCALE, so the tile lies in [-1, 1]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Na
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rows(X, rows, row_ok, offs_d, D, stride_xm, stride_xd, DOT_IN_FP32, OFFSETS_64, True)
    a_pa = tl.load(COEF + 0)
    a_pc = tl.load(COEF + 1)
    a_na = tl.load(COEF + 2)
    a_nc = tl.load(COEF + 3)
    b_pa = 2 * tl.load(COEF + 4)
    b_pc = 2 * tl.load(COEF + 5)
    b_na = 2 * tl.load(COEF + 6)
    b_nc = 2 * tl.load(COEF + 7)
    dx = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        y = _load_rows(Y, cols, col_ok, offs_d, D, stride_ym, stride_yd, DOT_IN_FP32, OFFSETS_64, True)
        d = tl.dot(x, tl.trans(y), input_precision=PRECISION, out_dtype=ACC)
        same_y, same_b = _pair_groups(rows, cols, row_ok, col_ok, XY, XB, YY, YB)
        ds = _by_group(same_y, same_b, a_pa, a_pc, a_na, a_nc) + _by_group(same_y, same_b, b_pa, b_pc, b_na, b_nc) * d
        ds = tl.where(col_ok[None, :], ds, 0.0)
        dx += tl.dot(ds.to(y.dtype), y, input_precision=PRECISION, out_dtype=ACC)
    d_ok = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DX + _row_offset(rows, stride_dxm, OFFSETS_64)[:, None] + offs_d[None, :], dx * tl.load(SCALE),
             mask=d_ok)


# ----------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by input width and BLOCK_D bucket. The gradient kernel holds
# SigLIP's dX accumulator ([BLOCK_M, BLOCK_D] fp32) and one tile, the moments kernel less (eight row sums):
# SigLIP's table, checked for both kernels with aot.py (bench/results/triton_aot_fairkl_sm80_sm90.txt).
TILE_CONFIGS = SIGLIP_TILE_CONFIGS
TUNING_KEY = ["D", "N_BUCKET", "PRECISION"]


def _shapes(elem_bytes: int, block_d: int, n: int):
    shapes = TILE_CONFIGS[elem_bytes][max(64, block_d)]
    return shapes[-1:] if n <= 64 else shapes


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if _interpreting():  # one config: launched directly, never benchmarked
        return [_config(INTERPRETER)]
    return [_config(sh) for sh in _shapes(args["Y"].element_size(), args["BLOCK_D"], max(args["Na"], args["M"]))]


fairkl_moments = TunedKernel(_fairkl_moments_kernel, _prune, TUNING_KEY)
fairkl_grad = TunedKernel(_fairkl_grad_kernel, _prune, TUNING_KEY)


def why_not(z: torch.Tensor) -> str | None:
    """Why these kernels cannot take rows ``z`` [N, D] (None: they can)."""
    return rows_why_not(z.dtype, z.device, z.shape[1])


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _args(q, q_ids, k, k_ids):
    assert q.is_contiguous() and k.is_contiguous() and q.dtype == k.dtype
    span = max(q.shape[0], k.shape[0]) * max(q.shape[1], 8)
    return dict(
        X=q, Y=k, XY=q_ids[:, 0].to(torch.int32).contiguous(), XB=q_ids[:, 1].to(torch.int32).contiguous(),
        YY=k_ids[:, 0].to(torch.int32).contiguous(), YB=k_ids[:, 1].to(torch.int32).contiguous(),
        Na=q.shape[0], M=k.shape[0], D=q.shape[1],
        stride_xm=q.stride(0), stride_xd=q.stride(1), stride_ym=k.stride(0), stride_yd=k.stride(1),
        N_BUCKET=triton.next_power_of_2(max(q.shape[0], k.shape[0])), PRECISION=_precision(k.dtype),
        ACC=tl.float64 if _acc(q.dtype) == torch.float64 else tl.float32,
        DOT_IN_FP32=_interpreting() and k.dtype == torch.bfloat16, OFFSETS_64=span >= INT32_LIMIT,
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[1])),
    )


def moments(q: torch.Tensor, q_ids: torch.Tensor, k: torch.Tensor, k_ids: torch.Tensor) -> torch.Tensor:
    """[Nq, 8] per-row group sums of d and d^2 (fused_contrastive.fairkl's backend contract)."""
    args = _args(q, q_ids, k, k_ids)
    out = torch.empty((q.shape[0], 8), dtype=_acc(q.dtype), device=q.device)
    grid = lambda meta: (triton.cdiv(args["Na"], meta["BLOCK_M"]),)  # noqa: E731
    fairkl_moments[grid](OUT=out, **args)
    return out


def grads(q: torch.Tensor, q_ids: torch.Tensor, k: torch.Tensor, k_ids: torch.Tensor,
          coef: torch.Tensor) -> torch.Tensor:
    """[Nq, D] sum_j (coef[g] + 2 coef[4 + g] d_ij) k_j, in the accumulation dtype."""
    args = _args(q, q_ids, k, k_ids)
    acc = _acc(q.dtype)
    coef = coef.to(device=q.device, dtype=torch.float64)
    # |a + 2 b d| <= |a| + 2 |b| max|q_i| max|k_j|: a bound on the tile, so that coef / bound keeps it in [-1, 1].
    norms = float(torch.linalg.vector_norm(q.double(), dim=1).max()) * float(torch.linalg.vector_norm(k.double(),
                                                                                                     dim=1).max()) \
        if q.shape[0] and k.shape[0] else 0.0
    bound = float((coef[:4].abs() + 2 * coef[4:].abs() * norms).max()) if coef.numel() else 0.0
    bound = bound if bound > 0 else 1.0
    scaled = (coef / bound).to(acc).contiguous()
    scale = torch.full((1,), bound, dtype=acc, device=q.device)
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    grid = lambda meta: (triton.cdiv(args["Na"], meta["BLOCK_M"]),)  # noqa: E731
    fairkl_grad[grid](COEF=scaled, SCALE=scale, DX=out, stride_dxm=out.stride(0), **args)
    return out


# ----------------------------------------------------------------------------- ahead-of-time check (no GPU)

def aot_reports(arch: int, dtype: str, dim: int):
    """Each shipped config of both kernels compiled for sm_<arch> as a real launch would be (aot.py's
    binder-faithful path), with ptxas's registers and spills and the matrix instruction used:
    ``python -m fused_contrastive.triton_kernels.fairkl 80:bfloat16:128 90:bfloat16:128``."""
    from fused_contrastive.triton_kernels import aot

    n = aot.EXAMPLE_ROWS
    feats = torch.empty((n, dim), dtype=getattr(torch, dtype))
    ids = torch.zeros((n, 2), dtype=torch.int64)
    args = _args(feats, ids, feats, ids)
    extra = {"moments": dict(OUT=torch.empty((n, 8))),
             "grad": dict(COEF=torch.empty(8), SCALE=torch.empty(1), DX=torch.empty((n, dim)), stride_dxm=dim)}
    kernels = {"moments": _fairkl_moments_kernel, "grad": _fairkl_grad_kernel}
    out = []
    for name, kernel in kernels.items():
        for shape in _shapes(feats.element_size(), args["BLOCK_D"], n):
            out.append((name, shape, *aot.shape_report(kernel, arch, {**args, **extra[name]}, _config(shape))))
    return out


if __name__ == "__main__":
    import sys

    flawed = 0
    for case in sys.argv[1:] or ["80:bfloat16:128", "90:bfloat16:128", "80:bfloat16:512", "90:bfloat16:512"]:
        arch, dtype, dim = case.split(":")
        for name, shape, regs, spills, mma in aot_reports(int(arch), dtype, int(dim)):
            bad = spills > 0 or mma == "fma (no tensor cores)"
            flawed += bad
            print(f"fairkl {name:<7} sm_{arch} {dtype} D={dim} {shape}  regs {regs:>3}  spills {spills:>5} B  {mma}"
                  + ("   <-- spills or no tensor cores" if bad else ""), flush=True)
    print(f"{flawed} flawed configs")
    sys.exit(1 if flawed else 0)
