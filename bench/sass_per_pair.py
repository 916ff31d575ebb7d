"""SASS lane-instructions per logit pair in each Triton kernel's tile loop (no GPU needed).

Each shipped config is compiled as the JIT would compile it for a real launch (triton_kernels/aot.py:
Triton's own argument specialisation), its cubin disassembled with the nvdisasm that ships with Triton,
and the tile loop found by its back edge (a branch to an earlier label). One trip of the loop handles
BLOCK_M x BLOCK_N logit pairs with num_warps warps, so each warp instruction of the body costs

    lane-instructions per pair = (instructions in the loop body) * 32 / (BLOCK_M * BLOCK_N / num_warps)

which is the per-pair work the SMs issue besides the matrix products' own (an HGMMA / HMMA covers many
pairs). Lower is better; the exp per pair alone costs about 1 (MUFU.EX2) plus its scaling.

    python bench/sass_per_pair.py                       # every variant, fwd/dQ/dK, sm_90 and sm_80, bf16, D = 128
    python bench/sass_per_pair.py --variants labels --arch 90 --kernels fwd --configs 1

A kernel with more than one tile loop (epsilon-SupInfoNCE's second pass; unmasked and masked tiles split
into separate loops) lists each loop in program order; the first is the one the per-pair column reports.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter

import triton  # noqa: E402

from fused_contrastive.triton_kernels import aot  # noqa: E402

# name: (use_mask, variant, den_bias, normalize). 'labels' is the headline: SupCon L_out with labels.
VARIANTS = {
    "labels": (False, "out", False, False),
    "mask": (True, "out", False, False),
    "normalize": (False, "out", False, True),
    "in": (False, "in", False, False),
    "bias": (False, "out", True, False),
    "eps": (False, "eps", True, False),
    "debiased": (False, "debiased", True, False),
    "debiased_hard": (False, "debiased_hard", True, False),
}
KERNEL_NAMES = {"fwd": "fwd", "bwd_dq": "dQ", "bwd_dk": "dK"}
MATRIX_OPS = ("HGMMA", "HMMA")
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[^\s;]*)?(.*);", re.M)
_LABEL = re.compile(r"^(\.L_x_\d+):\s*$", re.M)
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


@dataclass
class Loop:
    start: int  # byte address of the first instruction
    end: int  # address of the back-edge branch
    opcodes: collections.Counter  # opcode -> count in the body (NOPs excluded)

    @property
    def instructions(self) -> int:
        return sum(self.opcodes.values())

    @property
    def has_matrix_op(self) -> bool:
        return any(op in self.opcodes for op in MATRIX_OPS)


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, rest of the line) per instruction, and label addresses, from nvdisasm output."""
    return [(int(m.group(1), 16), m.group(2), m.group(0)) for m in _INSN.finditer(text)]


def tile_loops(text: str) -> list[Loop]:
    """Every outermost loop (back edge: a branch to a label at or before it) whose body holds a matrix
    instruction, in program order."""
    insns = parse_sass(text)
    label_at = {}
    for m in _LABEL.finditer(text):  # a label's address is the next instruction's
        nxt = _INSN.search(text, m.end())
        if nxt:
            label_at[m.group(1)] = int(nxt.group(1), 16)
    edges = []
    for addr, op, line in insns:
        b = _BRANCH.search(line)
        if op == "BRA" and b and label_at.get(b.group(1), addr + 1) <= addr:
            edges.append((label_at[b.group(1)], addr))
    outer = [e for e in edges if not any(o != e and o[0] <= e[0] and e[1] <= o[1] for o in edges)]
    loops = []
    for start, end in sorted(set(outer)):
        ops = collections.Counter(op for addr, op, _ in insns if start <= addr <= end and op != "NOP")
        loops.append(Loop(start, end, ops))
    return [lp for lp in loops if lp.has_matrix_op]


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: bytes) -> tuple[str, int]:
    """(nvdisasm text, registers per thread) of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = max(int(x) for x in re.findall(r"REG:(\d+)", res))
    return sass, regs


def per_pair(instructions: int, block_m: int, block_n: int, num_warps: int) -> float:
    return instructions * 32 / (block_m * block_n / num_warps)


def measure(kernel: str, arch: int, variant: str, config, dtype: str = "bfloat16", dim: int = 128):
    use_mask, formula, den_bias, normalize = VARIANTS[variant]
    compiled = aot.compile_jit_like(kernel, arch, dtype, dim, config, use_mask, formula, den_bias, normalize)
    sass, regs = disassemble(compiled.asm["cubin"])
    loops = tile_loops(sass)
    bm, bn, w = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
    pairs = [per_pair(lp.instructions, bm, bn, w) for lp in loops]
    return regs, loops, pairs


def row(kernel, arch, variant, config, regs, loops, pairs, top: int) -> str:
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    head = (f"{KERNEL_NAMES[kernel]:<3} sm_{arch} {variant:<13} {bm:>3}x{bn:<3} w{config.num_warps} "
            f"s{config.num_stages}  regs {regs:>3}")
    if not loops:
        return head + "  no tile loop found"
    body = " + ".join(str(lp.instructions) for lp in loops)
    mix = " ".join(f"{op}:{n}" for op, n in loops[0].opcodes.most_common(top))
    return f"{head}  insts {body:<11} per_pair {' / '.join(f'{p:5.1f}' for p in pairs):<13}  [{mix}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,80")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--kernels", default=",".join(KERNEL_NAMES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--configs", type=int, default=0, help="only the first N shipped configs (0: all)")
    parser.add_argument("--top", type=int, default=12, help="opcodes listed from the first loop's mix")
    args = parser.parse_args(argv)
    print(f"# bench/sass_per_pair.py (Triton {triton.__version__}, no GPU): SASS lane-instructions per logit pair "
          f"in the tile loop, {args.dtype} D = {args.dim}; insts = warp instructions in each tile loop's body "
          f"(NOPs excluded), per_pair = insts * 32 / (BLOCK_M * BLOCK_N / warps); [opcode mix of the first loop]")
    missing = 0
    for arch in (int(a) for a in args.arch.split(",")):
        for variant in args.variants.split(","):
            use_mask, formula, den_bias, _ = VARIANTS[variant]
            for kernel in args.kernels.split(","):
                configs = aot.shipped_configs(kernel, args.dim, args.dtype, arch, den_bias, formula)
                for config in configs[:args.configs or None]:
                    regs, loops, pairs = measure(kernel, arch, variant, config, args.dtype, args.dim)
                    missing += not loops
                    print(row(kernel, arch, variant, config, regs, loops, pairs, args.top), flush=True)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
