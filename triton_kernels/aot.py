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
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import supcon

KERNELS = {
    "fwd": supcon._supcon_fwd_kernel,
    "bwd_dq": supcon._supcon_bwd_dq_kernel,
    "bwd_dk": supcon._supcon_bwd_dk_kernel,
}
POINTER_ARGS = {"Q": "in", "K": "in", "INV_TAU": "acc", "AL": "*i64", "KL": "*i64", "MASK": "*u8",
                "AG": "*i64", "KG": "*i64", "B_SAME": "acc", "B_OTHER": "acc",
                "LSE": "acc", "POS_SUM": "acc", "POS_AUX": "acc", "COEF": "acc", "POS_SCALE": "acc", "DEN_SCALE": "acc",
                "DQ": "acc", "DK": "acc", "G_SCALE": "acc", "GL": "acc", "epsilon": "fp32"}
TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


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


FAMILY = {"fwd": "fwd", "bwd_dq": "bwd", "bwd_dk": "bwd"}
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


def compile_one(kernel: str, arch: int, dtype: str, dim: int, config, use_mask: bool = False,
                precision: str | None = None, variant: str = "out", den_bias: bool = False) -> Report:
    fn = KERNELS[kernel]
    in_ty = TORCH_TO_TRITON[dtype]
    signature = {}
    for name in fn.arg_names:
        kind = POINTER_ARGS.get(name)
        if kind == "in":
            signature[name] = f"*{in_ty}"
        elif kind == "acc":
            signature[name] = "*fp32"
        elif kind is not None:
            signature[name] = kind
        else:
            signature[name] = "i32"
    if precision is None:
        precision = supcon.FP32_PRECISION if dtype == "float32" else "ieee"
    constexprs = dict(HAS_SELF=True, USE_MASK=use_mask, PRECISION=precision, ACC=tl.float32, DOT_IN_FP32=False,
                      NORMALIZE=False, OFFSETS_64=False, VARIANT=supcon.VARIANTS[variant], DEN_BIAS=den_bias,
                      BLOCK_M=config.kwargs["BLOCK_M"], BLOCK_N=config.kwargs["BLOCK_N"],
                      BLOCK_D=max(16, triton.next_power_of_2(dim)))
    if "TAU_GRAD" in fn.arg_names:  # dQ's per-row sum_j g_ij l_ij (only for a learnable temperature)
        constexprs["TAU_GRAD"] = False
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
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
