"""Ahead-of-time compilation of the shipped kernel configs for a GPU we may not have.

``triton.compile`` with an explicit ``GPUTarget`` needs no GPU: it lowers to PTX and runs
Triton's bundled ``ptxas``, whose verbose report gives registers, spills and shared
memory; the PTX shows which matrix instructions were chosen. The test suite fails on
any spill; ``python -m fused_contrastive.triton_kernels.aot`` prints the whole table.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import supcon

KERNELS = {
    "fwd": supcon._supcon_fwd_kernel,
    "bwd_dq": supcon._supcon_bwd_dq_kernel,
    "bwd_dk": supcon._supcon_bwd_dk_kernel,
}


@dataclass
class Report:
    kernel: str
    arch: int
    dtype: str
    dim: int
    use_mask: bool
    variant: str
    den_bias: bool
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    mma: str  # which matrix instruction the PTX uses

    def row(self) -> str:
        return (f"{self.kernel:<7} sm_{self.arch} {self.dtype:<9} D={self.dim:<4} mask={int(self.use_mask)} "
                f"{self.variant:<8} bias={int(self.den_bias)} "
                f"{self.block_m:>3}x{self.block_n:<3} w{self.num_warps} s{self.num_stages}  regs {self.registers:>3}  "
                f"spills {self.spill_bytes:>5} B  smem {self.shared_bytes:>6} B  {self.mma}")


FAMILY = {"fwd": "fwd", "bwd_dq": "bwd", "bwd_dk": "bwd_dk"}
ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def shipped_configs(kernel: str, dim: int, dtype: str, arch: int, den_bias: bool = False, variant: str = "out"):
    """The configs the autotuner may try for this kernel, D, dtype and GPU (large N, and the small-N one)."""
    block_d = max(16, triton.next_power_of_2(dim))
    family, width = FAMILY[kernel], ELEM_BYTES[dtype]
    shapes = supcon.tile_shapes(family, width, block_d, arch, 1 << 15, den_bias, supcon.VARIANTS[variant])  # small N uses the last of these
    return [supcon._config(shape) for shape in shapes]


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    try:  # the signature changed across Triton releases
        ptxas = get_ptxas(arch)
    except TypeError:
        ptxas = get_ptxas()
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = max(int(x) for x in re.findall(r"Used (\d+) registers", log))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills, 0


EXAMPLE_ROWS = 1024  # rows of the example tensors: what matters is how the JIT classes each argument (below)
EXAMPLE_MASK = 512  # a [B, B] user mask with B = rows / 2, as two views of B samples


def example_spec(dtype: str, dim: int, use_mask: bool = False, variant: str = "out", den_bias: bool = False,
                 normalize: bool = False):
    """A spec shaped like a real launch: contiguous [N, D] features (stride 1 along D, row stride D), two
    views of N / 2 samples, int64 labels or a uint8 [B, B] mask. Only the properties the JIT specialises
    on matter (a stride equal to 1, integers and addresses divisible by 16), not the values."""
    import torch
    from fused_contrastive import spec as spec_mod

    n = EXAMPLE_ROWS
    feats = torch.empty((n, dim), dtype=getattr(torch, dtype))
    labels = torch.arange(n, dtype=torch.int64) % (n // 2)
    mask = torch.zeros((EXAMPLE_MASK, EXAMPLE_MASK), dtype=torch.uint8) if use_mask else None
    bias = None
    if den_bias:
        table = torch.zeros(n // 2, dtype=torch.float32)
        bias = spec_mod.DenominatorBias(labels, labels, table, table.clone())
    kind = "debiased" if variant == "debiased_hard" else variant
    return spec_mod.ContrastSpec(
        anchors=feats, keys=feats, self_offset=0, anchor_labels=None if use_mask else labels,
        key_labels=None if use_mask else labels, num_classes=n // 2, mask=mask, temperature=0.1,
        base_temperature=None, no_positive="zero", normalize=normalize, tau_float=0.1, variant=kind,
        den_bias=bias, epsilon=0.1 if kind == "eps" else 0.0, tau_plus=0.1 if kind == "debiased" else 0.0,
        beta=0.5 if variant == "debiased_hard" else 0.0)


def example_kwargs(kernel: str, spec, config) -> dict:
    """Every argument the launcher (supcon.forward_stats / backward_grads) passes to ``kernel``, built by the
    launcher's own helper, with the config's tile constexprs."""
    import torch

    Q = K = spec.keys
    inv_tau = torch.full((), 1 / spec.tau_float, dtype=torch.float32)
    kwargs = supcon._common_args(spec, Q, K, inv_tau)
    rows = torch.empty(3 * Q.shape[0], dtype=torch.float32)  # LSE-shaped buffers ([3, Na] for hard negatives)
    if kernel == "fwd":
        kwargs.update(LSE=rows, POS_SUM=rows.clone(), POS_AUX=rows.clone())
    else:
        out = torch.empty_like(Q)
        kwargs.update(LSE=rows, COEF=rows.clone(), POS_SCALE=rows.clone(), DEN_SCALE=rows.clone())
        kwargs.update({"DQ" if kernel == "bwd_dq" else "DK": out,
                       "stride_dqm" if kernel == "bwd_dq" else "stride_dkm": out.stride(0)})
        if supcon.VARIANTS[variant_name(spec)] in supcon._POSITIVES_IN_LOOP:
            pos_grad = torch.zeros(1, dtype=torch.float32)
        else:  # the positive part of the gradient, [rows, D] fp32 from the launcher
            pos_grad = torch.empty(Q.shape, dtype=torch.float32)
        kwargs.update(POS_GRAD=pos_grad, stride_pgm=pos_grad.stride(0), G_LOG2=torch.zeros(1, dtype=torch.float32))
        if kernel == "bwd_dq":  # the temperature's per-row sums: off unless the temperature is learnable
            kwargs.update(GL=torch.zeros(1, dtype=torch.float32), TAU_GRAD=False)
        if kernel == "bwd_dk":  # L_out's per-row exponent shift and the common sign of coef
            kwargs.update(ROW_SHIFT=rows.clone(), COEF_SIGN=torch.ones(1, dtype=torch.float32))
    kwargs.update(config.kwargs)
    return kwargs


def variant_name(spec) -> str:
    return next(name for name, code in supcon.VARIANTS.items() if code == supcon.variant_code(spec))


def jit_source(fn, arch: int, kwargs: dict, num_warps: int, num_stages: int):
    """(ASTSource, target, options) exactly as ``JITFunction.run`` would build them for these arguments on an
    sm_<arch> GPU: Triton's own binder classes every argument (an integer equal to 1 becomes a constant, one
    divisible by 16 and a 16-byte aligned pointer get tt.divisibility = 16), so the compiled code has the
    vector loads and the register use of a real launch. Without that, strides of 1 stay runtime values and
    every load is scalar."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    launch = {**kwargs, "num_warps": num_warps, "num_stages": num_stages}
    bound_args, specialization, options = binder(**launch)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options.__dict__


def shape_report(fn, arch: int, kwargs: dict, config) -> tuple[int, int, str]:
    """(registers, spill bytes, the product instruction: wgmma / mma.sync / fma) of ``fn`` compiled for sm_<arch>
    with ``kwargs`` and one tile ``config``, as a launch would compile it: every kernel file's AOT check."""
    src, target, options = jit_source(fn, arch, {**kwargs, **config.kwargs}, config.num_warps, config.num_stages)
    ptx = triton.compile(src, target=target, options=options).asm["ptx"]
    regs, spills, _ = _ptxas_report(ptx, arch)
    return regs, spills, "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma (no tensor cores)")


def compile_jit_like(kernel: str, arch: int, dtype: str, dim: int, config, use_mask: bool = False,
                     variant: str = "out", den_bias: bool = False, normalize: bool = False):
    """The compiled kernel (asm: ttir ... ptx, cubin) a launch with real-shaped arguments would run."""
    spec = example_spec(dtype, dim, use_mask, variant, den_bias, normalize)
    kwargs = example_kwargs(kernel, spec, config)
    src, target, options = jit_source(KERNELS[kernel], arch, kwargs, config.num_warps, config.num_stages)
    return triton.compile(src, target=target, options=options)


def compile_one(kernel: str, arch: int, dtype: str, dim: int, config, use_mask: bool = False,
                variant: str = "out", den_bias: bool = False) -> Report:
    compiled = compile_jit_like(kernel, arch, dtype, dim, config, use_mask, variant, den_bias)
    ptx = compiled.asm["ptx"]
    regs, spills, _ = _ptxas_report(ptx, arch)
    mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma (no tensor cores)")
    return Report(kernel, arch, dtype, dim, use_mask, variant, den_bias, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"],
                  config.num_warps, config.num_stages, regs, spills, compiled.metadata.shared, mma)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="80,90")
    parser.add_argument("--dims", default="64,128,256,512")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--cases", default=None,
                        help="ARCH:DTYPE:D[:VARIANT][:bias],... instead of the product of the above (VARIANT: "
                             "in, eps or debiased, default out; ':bias': a denominator bias table, as DCL, BCL, "
                             "spread, epsilon-SupInfoNCE use)")
    args = parser.parse_args(argv)
    if args.cases:
        cases = [(int(f[0]), f[1], int(f[2]), next((v for v in f[3:] if v in supcon.VARIANTS), "out"),
                  "bias" in f[3:]) for f in (c.split(":") for c in args.cases.split(","))]
    else:
        cases = [(int(a), t, int(d), "out", False) for a in args.arch.split(",") for d in args.dims.split(",")
                 for t in args.dtypes.split(",")]
    bad = 0
    for arch, dtype, dim, variant, den_bias in cases:
        for kernel in KERNELS:
            for config in shipped_configs(kernel, dim, dtype, arch, den_bias, variant):
                report = compile_one(kernel, arch, dtype, dim, config, variant=variant, den_bias=den_bias)
                flaw = report.spill_bytes > 0 or report.mma not in ("mma.sync", "wgmma")
                bad += flaw
                print(report.row() + ("   <-- spills or no tensor cores" if flaw else ""), flush=True)
    print(f"{bad} flawed configs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
