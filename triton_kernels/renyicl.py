"""RényiCL's per-row statistics and gradient tiles as Triton kernels.

For anchor rows q_r (the source views stacked) against keys k_j (one target view) with logits
``l_rj = q_r . k_j / tau``, each row has at most one positive column (``POS_COL[r]``, -1: none in these keys).
The loss needs, per row, over the negatives only (the positive column left out):
``m_r = max_j gamma l_rj``, ``s_r = sum_j e^{gamma l_rj - m_r}`` and ``ws_r = sum_j l_rj e^{gamma l_rj - m_r}``
(an online max and rescaled sums, one pass over the key tiles). The positive logit itself is one dot product
per row, which the launcher forms. The batch-level ratio of the loss is then O(rows) work in torch.

The gradient of every negative logit is ``f e^{gamma l_rj - M}`` with one global shift M (>= every gamma l) and
one global factor f: the tile ``e^{gamma l - M}`` lies in [0, 1] in any input dtype, the factor multiplies the
fp32 result. dQ comes from a row-parallel pass, dK from a column-parallel one (no atomics); the positives'
terms (one key per row) are added by the launcher. Scalars (1 / tau, gamma, M) arrive as a tensor in the
accumulation dtype, so a float64 run (the interpreter) is exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_contrastive.triton_kernels.siglip import TILE_CONFIGS as SIGLIP_TILE_CONFIGS
from fused_contrastive.triton_kernels.supcon import (INT32_LIMIT, INTERPRETER, rows_why_not, _autotune_options, _config,
                                                     _device_guard, _interpreting, _load_rows, _precision, _row_offset)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _logit_tile(q, qs, K, KS, cols, col_ok, offs_d, D, stride_km, stride_kd, inv_tau, SCALED: tl.constexpr,
                PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr):
    """(key rows, their per-row scales, the logits l = (qs q) . (ks k) / tau) of one key tile."""
    k = _load_rows(K, cols, col_ok, offs_d, D, stride_km, stride_kd, DOT_IN_FP32, OFFSETS_64, True)
    l = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
    if SCALED:
        ks = tl.load(KS + cols, mask=col_ok, other=0.0)
        l = l * qs[:, None] * ks[None, :]
    else:
        ks = qs
    return k, ks, l


@triton.jit
def _row_scales(S, idx, ok, SCALED: tl.constexpr):
    """The rows' scales (SCALED), else ones (unused then: the compiler drops them)."""
    if SCALED:
        scales = tl.load(S + idx, mask=ok, other=0.0)
    else:
        scales = tl.where(ok, 1.0, 1.0)
    return scales


@triton.jit
def _renyi_stats_kernel(Q, K, QS, KS, POS_COL, PARAMS, MAX, SUM, WSUM, R, M, D,
                        stride_qm, stride_qd, stride_km, stride_kd,
                        N_BUCKET,  # autotuning key only
                        SCALED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                        OFFSETS_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """(m_r, s_r, ws_r) over the negatives of one block of rows, all M keys."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, OFFSETS_64, True)
    pos_col = tl.load(POS_COL + rows, mask=row_ok, other=-1)
    qs = _row_scales(QS, rows, row_ok, SCALED)
    inv_tau = tl.load(PARAMS)
    gamma = tl.load(PARAMS + 1)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], ACC)
    ws = tl.zeros([BLOCK_M], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        _, _, l = _logit_tile(q, qs, K, KS, cols, col_ok, offs_d, D, stride_km, stride_kd, inv_tau, SCALED,
                              PRECISION, ACC, DOT_IN_FP32, OFFSETS_64)
        neg = col_ok[None, :] & (cols[None, :] != pos_col[:, None])
        g = tl.where(neg, gamma * l, float("-inf"))
        m_new = tl.maximum(m, tl.max(g, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no negative yet: sums stay 0
        rescale = tl.exp(m - shift)
        e = tl.exp(g - shift[:, None])
        s = s * rescale + tl.sum(e, 1)
        ws = ws * rescale + tl.sum(tl.where(neg, l, 0.0) * e, 1)
        m = m_new
    tl.store(MAX + rows, m, mask=row_ok)
    tl.store(SUM + rows, s, mask=row_ok)
    tl.store(WSUM + rows, ws, mask=row_ok)


@triton.jit
def _renyi_bwd_dq_kernel(Q, K, QS, KS, POS_COL, PARAMS, DQ, R, M, D,
                         stride_qm, stride_qd, stride_km, stride_kd, stride_dqm,
                         N_BUCKET,
                         SCALED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                         OFFSETS_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """dQ_r = f / tau sum_{j negative} e^{gamma l_rj - M} k_j (PARAMS: 1/tau, gamma, M, f)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, OFFSETS_64, True)
    pos_col = tl.load(POS_COL + rows, mask=row_ok, other=-1)
    qs = _row_scales(QS, rows, row_ok, SCALED)
    inv_tau = tl.load(PARAMS)
    gamma = tl.load(PARAMS + 1)
    shift = tl.load(PARAMS + 2)
    factor = tl.load(PARAMS + 3)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        k, ks, l = _logit_tile(q, qs, K, KS, cols, col_ok, offs_d, D, stride_km, stride_kd, inv_tau, SCALED,
                               PRECISION, ACC, DOT_IN_FP32, OFFSETS_64)
        # (padded rows too: their e^{0 - M} could overflow the 16-bit tile)
        neg = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != pos_col[:, None])
        e = tl.where(neg, tl.exp(gamma * l - shift), 0.0)
        if SCALED:  # the gradient of q^ = qs q: sum_j e_ij k^_j = sum_j (e_ij ks_j) k_j
            e = e * ks[None, :]
        dq += tl.dot(e.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    d_ok = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DQ + _row_offset(rows, stride_dqm, OFFSETS_64)[:, None] + offs_d[None, :], dq * (factor * inv_tau),
             mask=d_ok)


@triton.jit
def _renyi_bwd_dk_kernel(Q, K, QS, KS, POS_COL, PARAMS, DK, R, M, D,
                         stride_qm, stride_qd, stride_km, stride_kd, stride_dkm,
                         N_BUCKET,
                         SCALED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                         OFFSETS_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """dK_j = f / tau sum_{r: j negative} e^{gamma l_rj - M} q_r, one block of key columns per program."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, cols, col_ok, offs_d, D, stride_km, stride_kd, DOT_IN_FP32, OFFSETS_64, True)
    ks = _row_scales(KS, cols, col_ok, SCALED)
    inv_tau = tl.load(PARAMS)
    gamma = tl.load(PARAMS + 1)
    shift = tl.load(PARAMS + 2)
    factor = tl.load(PARAMS + 3)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start in range(0, R, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        q = _load_rows(Q, rows, row_ok, offs_d, D, stride_qm, stride_qd, DOT_IN_FP32, OFFSETS_64, True)
        pos_col = tl.load(POS_COL + rows, mask=row_ok, other=-1)
        l = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
        if SCALED:
            qs = tl.load(QS + rows, mask=row_ok, other=0.0)
            l = l * qs[:, None] * ks[None, :]
        neg = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != pos_col[:, None])
        e = tl.where(neg, tl.exp(gamma * l - shift), 0.0)
        if SCALED:
            e = e * qs[:, None]
        dk += tl.dot(tl.trans(e.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC)
    d_ok = col_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DK + _row_offset(cols, stride_dkm, OFFSETS_64)[:, None] + offs_d[None, :], dk * (factor * inv_tau),
             mask=d_ok)


# ----------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by input width and BLOCK_D bucket: the SigLIP kernels' table
# (the same [BLOCK, BLOCK_D] fp32 accumulator in the backward, less in the forward); checked for spills on
# sm_80 / sm_90 by aot_reports (bench/results/triton_aot_renyicl_cacr_sm80_sm90.txt).
TILE_CONFIGS = SIGLIP_TILE_CONFIGS
TUNING_KEY = ["D", "N_BUCKET", "PRECISION"]


def tile_shapes(elem_bytes: int, block_d: int, n: int, arch: int, drop: dict | None = None):
    """The shapes the autotuner may try; ``drop``: {80 (before Hopper) or 90: {BLOCK_D bucket: shapes}} that a
    kernel leaves out there because aot_reports shows them spilling."""
    bucket = max(64, block_d)
    shapes = TILE_CONFIGS[elem_bytes][bucket]
    dropped = (drop or {}).get(90 if arch >= 90 else 80, {}).get(bucket, ())
    shapes = [sh for sh in shapes if sh not in dropped]
    return shapes[-1:] if n <= 64 else shapes


class TunedKernel:
    """``kernel[grid](**args)`` autotuned over this file's configs for the launch's width and D (one config:
    launched directly, no benchmark), under the inputs' device. ``keys``: the name of the key tensor argument."""

    def __init__(self, kernel, keys: str, rows: str, cols: str, drop: dict | None = None):
        self.kernel, self.keys, self.rows, self.cols = kernel, keys, rows, cols
        self.drop = drop
        self.configs = [_config(sh) for sh in sorted({sh for t in TILE_CONFIGS.values() for v in t.values() for sh in v})]
        self.tuner = triton.autotune(configs=self.configs, key=TUNING_KEY,
                                     prune_configs_by={"early_config_prune": self._prune},
                                     **_autotune_options())(kernel)

    def _prune(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if _interpreting():
            return [_config(INTERPRETER)]
        n = max(args[self.rows], args[self.cols])
        keys = args[self.keys]
        major, minor = torch.cuda.get_device_capability(keys.device)
        return [_config(sh) for sh in tile_shapes(keys.element_size(), args["BLOCK_D"], n, 10 * major + minor,
                                                  self.drop)]

    def __getitem__(self, grid):
        def launch(**args):
            with _device_guard(args[self.keys].device):
                configs = self._prune(self.configs, {}, **args)
                if len(configs) == 1:
                    return self.kernel[grid](**args, **configs[0].all_kwargs())
                return self.tuner[grid](**args)
        return launch


renyi_stats_kernel = TunedKernel(_renyi_stats_kernel, "K", "R", "M")
renyi_dq_kernel = TunedKernel(_renyi_bwd_dq_kernel, "K", "R", "M")
renyi_dk_kernel = TunedKernel(_renyi_bwd_dk_kernel, "K", "R", "M")


def why_not(dtype: torch.dtype, device: torch.device, dim: int, fp16_ok: bool = True) -> str | None:
    """Why these kernels cannot run features of this dtype, device and width (None: they can)."""
    return rows_why_not(dtype, device, dim, None if fp16_ok else (
        "float16 inputs: the gradient tiles' weights would fall into fp16's subnormals; pass bfloat16 or float32 "
        "features"))


def offsets_64(*tensors) -> bool:
    span = max(t.shape[0] * max(t.stride(0), t.shape[1]) for t in tensors)
    return span >= INT32_LIMIT


def common_args(X, Y, acc: torch.dtype, x_name="Q", y_name="K") -> dict:
    dim = Y.shape[1]
    return {x_name: X, y_name: Y, "D": dim,
            "stride_" + x_name.lower() + "m": X.stride(0), "stride_" + x_name.lower() + "d": X.stride(1),
            "stride_" + y_name.lower() + "m": Y.stride(0), "stride_" + y_name.lower() + "d": Y.stride(1),
            "N_BUCKET": triton.next_power_of_2(max(X.shape[0], Y.shape[0], 1)),
            "PRECISION": _precision(Y.dtype), "ACC": tl.float64 if acc == torch.float64 else tl.float32,
            "DOT_IN_FP32": _interpreting() and Y.dtype == torch.bfloat16, "OFFSETS_64": offsets_64(X, Y),
            "BLOCK_D": max(16, triton.next_power_of_2(dim))}


def _params(acc, device, *values) -> torch.Tensor:
    return torch.stack([v.reshape(()).to(acc) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=acc)
                        for v in values]).to(device)


def hat(X, S, acc):
    """The rows the kernels see, in ``acc``: X, or X scaled row by row by S."""
    return X.to(acc) if S is None else X.to(acc) * S.to(acc)[:, None]


def scale_args(QS, KS, acc, device) -> dict:
    dummy = torch.zeros(1, dtype=acc, device=device)
    return dict(QS=dummy if QS is None else QS.to(acc).contiguous(), KS=dummy if KS is None else KS.to(acc).contiguous(),
                SCALED=QS is not None)


def stats(Q, K, pos_col, inv_tau: float, gamma: float, acc: torch.dtype, QS=None, KS=None):
    """(positive logit, m, s, ws) per row of Q [R, D] against K [M, D] (see the module docstring); QS / KS: per
    row scales of Q and K (both or neither: the normalised rows are QS q, KS k)."""
    R = Q.shape[0]
    pos_col = pos_col.to(torch.int32).contiguous()
    m, s, ws = (torch.empty(R, dtype=acc, device=Q.device) for _ in range(3))
    if R:
        args = common_args(Q, K, acc)
        grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]),)  # noqa: E731
        renyi_stats_kernel[grid](POS_COL=pos_col, PARAMS=_params(acc, Q.device, inv_tau, gamma), MAX=m, SUM=s,
                                 WSUM=ws, R=R, M=K.shape[0], **scale_args(QS, KS, acc, Q.device), **args)
    has = pos_col >= 0
    idx = pos_col[has].long()
    pos = torch.zeros(R, dtype=acc, device=Q.device)
    pos[has] = (hat(Q[has], None if QS is None else QS[has], acc) * hat(K[idx], None if KS is None else KS[idx], acc)
                ).sum(1) * inv_tau
    return pos, m, s, ws


def grads(Q, K, pos_col, inv_tau: float, gamma: float, shift, factor, pos_weight, acc: torch.dtype,
          need_dq: bool = True, need_dk: bool = True, QS=None, KS=None):
    """(dQ, dK) in ``acc`` (of the normalised rows when scaled) of the loss whose logit gradients are
    factor e^{gamma l - shift} on the negatives and pos_weight[r] on row r's positive (both already times the
    upstream gradient); None where not needed."""
    R, M = Q.shape[0], K.shape[0]
    pos_col32 = pos_col.to(torch.int32).contiguous()
    params = _params(acc, Q.device, inv_tau, gamma, shift, factor)
    args = {**common_args(Q, K, acc), **scale_args(QS, KS, acc, Q.device)}
    dq = dk = None
    has = pos_col >= 0
    idx = pos_col[has].long()
    w = pos_weight.to(acc)[has][:, None] * inv_tau
    if need_dq:
        dq = torch.zeros(Q.shape, dtype=acc, device=Q.device)
        if R and M:
            grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]),)  # noqa: E731
            renyi_dq_kernel[grid](POS_COL=pos_col32, PARAMS=params, DQ=dq, R=R, M=M, stride_dqm=dq.stride(0), **args)
        dq[has] += w * hat(K[idx], None if KS is None else KS[idx], acc)
    if need_dk:
        dk = torch.zeros(K.shape, dtype=acc, device=K.device)
        if R and M:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_N"]),)  # noqa: E731
            renyi_dk_kernel[grid](POS_COL=pos_col32, PARAMS=params, DK=dk, R=R, M=M, stride_dkm=dk.stride(0), **args)
        dk.index_add_(0, idx, w * hat(Q[has], None if QS is None else QS[has], acc))
    return dq, dk


# ----------------------------------------------------------------------------- ahead-of-time check (no GPU)

def aot_reports(arch: int, dtype: str, dim: int):
    """Each shipped config of the three kernels compiled for sm_<arch> as a real launch would be (aot.py's
    binder-faithful path): (kernel, shape, registers, spill bytes, matrix instruction)."""
    from fused_contrastive.triton_kernels import aot

    n = aot.EXAMPLE_ROWS
    feats = torch.empty((n, dim), dtype=getattr(torch, dtype))
    args = common_args(feats, feats, torch.float32)
    col = torch.empty(n, dtype=torch.int32)
    vec = torch.empty(n, dtype=torch.float32)
    params = torch.empty(4, dtype=torch.float32)
    grad = torch.empty((n, dim), dtype=torch.float32)
    base = dict(POS_COL=col, PARAMS=params, R=n, M=n, QS=vec, KS=vec, SCALED=True)
    extra = {"stats": dict(MAX=vec, SUM=vec, WSUM=vec), "bwd_dq": dict(DQ=grad, stride_dqm=dim),
             "bwd_dk": dict(DK=grad, stride_dkm=dim)}
    kernels = {"stats": renyi_stats_kernel, "bwd_dq": renyi_dq_kernel, "bwd_dk": renyi_dk_kernel}
    return aot_table(kernels, {k: {**args, **base, **v} for k, v in extra.items()}, arch, feats.element_size(),
                     args["BLOCK_D"])


def aot_table(kernels: dict, launch_args: dict, arch: int, elem_bytes: int, block_d: int):
    """Every shape each TunedKernel of ``kernels`` may launch on sm_<arch>, compiled as the JIT would."""
    from fused_contrastive.triton_kernels import aot

    out = []
    for name, tuned in kernels.items():
        kernel = tuned.kernel
        for shape in tile_shapes(elem_bytes, block_d, 1 << 15, arch, tuned.drop):
            out.append((name, shape, *aot.shape_report(kernel, arch, launch_args[name], _config(shape))))
    return out


AOT_CASES = [f"{arch}:{dtype}:{dim}" for arch in (80, 90)
             for dtype, dim in (("bfloat16", 64), ("bfloat16", 128), ("bfloat16", 256), ("bfloat16", 512),
                                ("float32", 33))]


def aot_main(label: str, reports, argv) -> int:
    flawed = 0
    for case in argv or AOT_CASES:
        arch, dtype, dim = case.split(":")
        for name, shape, regs, spills, mma in reports(int(arch), dtype, int(dim)):
            bad = spills > 0 or mma == "fma (no tensor cores)"
            flawed += bad
            print(f"{label} {name:<7} sm_{arch} {dtype:<8} D={dim:<4} {shape}  regs {regs:>3}  spills {spills:>5} B  "
                  f"{mma}" + ("   <-- spills or no tensor cores" if bad else ""), flush=True)
    print(f"{flawed} flawed configs")
    return 1 if flawed else 0


if __name__ == "__main__":
    import sys

    sys.exit(aot_main("renyicl", aot_reports, sys.argv[1:]))
