"""``make cuda-check``: compile every ``csrc/*.cu`` with nvcc for sm_80 and sm_90a (no GPU needed) and report,
per kernel, what ptxas allocated (registers, spills, stack) and the SASS instruction mix that says whether
the tensor cores and the exp unit are where they should be (HMMA, MUFU.EX2, shared-memory traffic, barriers).
Also checks ``csrc/*_api.cpp`` against torch's headers when they are installed (syntax only: linking needs a
CUDA torch). Exits non-zero on any compile error; spills are reported, not fatal.

Per kernel it also finds the hot loop (the loop over streamed tiles: the backward branch whose body holds the
most HMMA) and reports its static SASS instruction count, i.e. instructions per tile iteration when no inner
loop repeats, and lane-instructions per logit pair = loop instructions * 32 / pairs per warp per iteration
(every kernel's warp owns 16 rows x 64 columns of a tile: 1024 pairs).

    python bench/cuda_resources.py [--out bench/results/cuda_resources_sm80_sm90.txt] [--csrc DIR]
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
ARCHS = ("sm_80", "sm_90a")
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-lineinfo"]
PAIRS_PER_WARP = 16 * 64  # pairs one warp handles per tile iteration, in both kernel families
# SASS opcodes worth counting: tensor-core MMA, the exp/log unit, shared memory, barriers, local memory.
OPCODES = ("HMMA", "MUFU", "LDS", "LDSM", "STS", "BAR", "LDL", "STL", "SHFL")


def _cuobjdump():
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("cuobjdump")


RULES = {"0": "labels", "1": "mask_u8", "2": "mask_f32"}


def _demangled(name: str) -> str:
    """mma::supcon_bwd_dq_kernel<bf16, DF=16, labels> from the mangled name (no c++filt needed for these
    templates); the positive rule is the third template argument where the kernels have one."""
    m = re.search(r"(\d+)(supcon_\w+_kernel)I(\w+?)Li(\d+)E(?:L\w*?4RuleE(\d+)E)?", name)
    if not m:
        return name
    dtype = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}.get(m.group(3), m.group(3))
    family = "mma" if "mma_kernels" in name else "wmma"
    rule = f", {RULES.get(m.group(5), m.group(5))}" if m.group(5) is not None else ""
    return f"{family}::{m.group(2)}<{dtype}, DF={m.group(4)}{rule}>"


def compile_arch(source: str, arch: str, workdir: str):
    """(cubin path, {kernel: ptxas line}) or raise CalledProcessError with nvcc's output."""
    cubin = os.path.join(workdir, f"{os.path.basename(source)}.{arch}.cubin")
    include = f"-I{os.path.dirname(os.path.abspath(source))}"
    out = subprocess.run(["nvcc", *NVCC_FLAGS, include, "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", cubin, source],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise subprocess.CalledProcessError(out.returncode, "nvcc", out.stdout, out.stderr)
    usage, current = {}, None
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = _demangled(m.group(1))
        elif current and ("registers" in line or "spill" in line):
            usage[current] = (usage.get(current, "") + " " + line.split(":", 1)[-1].strip()).strip()
    return cubin, usage


def sass_mix(cubin: str, tool: str):
    """({kernel: Counter of opcodes}, {kernel: hot-loop summary})"""
    text = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    mix, code, current = {}, {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            current = _demangled(m.group(1))
            mix[current], code[current] = collections.Counter(), []
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)(?:\.[\w.]+)?\s*([^;]*);", line)
        if current and m:
            op = m.group(2)
            target = re.match(r"\s*`?\(?(0x[0-9a-f]+)", m.group(3)) if op == "BRA" else None
            code[current].append((int(m.group(1), 16), op, int(target.group(1), 16) if target else None))
            if op in OPCODES:
                mix[current][op] += 1
    return mix, {kernel: hot_loop(instrs) for kernel, instrs in code.items()}


def hot_loop(instrs):
    """The loop over streamed tiles: of the spans [branch target, backward branch], the one with the most HMMA
    (the widest on a tie). Its static instruction count, HMMA and MUFU in it, and how many inner loops it
    holds (their bodies run more than once per iteration, so the count is then a lower bound)."""
    loops = [(target, addr) for addr, op, target in instrs if op == "BRA" and target is not None and target <= addr]
    best = None
    for start, end in loops:
        body = [op for addr, op, _ in instrs if start <= addr <= end]
        key = (body.count("HMMA"), len(body))
        if best is None or key > best[0]:
            inner = sum(1 for s, e in loops if start <= s and e <= end and (s, e) != (start, end))
            best = (key, body, inner)
    if best is None or best[0][0] == 0:
        return None
    _, body, inner = best
    return dict(instructions=len(body), hmma=body.count("HMMA"), mufu=body.count("MUFU"), inner_loops=inner,
                per_pair=len(body) * 32 / PAIRS_PER_WARP)


def loop_summary(arch: str, loops) -> list:
    """One line per (family, kernel, dtype): the hot-loop figures of every DF and rule side by side."""
    rows = collections.defaultdict(list)
    for kernel, loop in sorted(loops.items()):
        m = re.match(r"(\w+::\w+)<(\w+), DF=(\d+)(?:, (\w+))?>", kernel)
        if m and loop:
            rows[(m.group(1), m.group(2))].append(
                (int(m.group(3)), m.group(4) or "any", f"{loop['instructions']}/{loop['per_pair']:.1f}"))
    return [f"  {arch:<7} {name:<28} {dtype:<5} " + " ".join(f"DF={df},{rule}:{fig}" for df, rule, fig in sorted(cells))
            for (name, dtype), cells in sorted(rows.items())]


def parse_summary(lines) -> dict:
    """{(arch, kernel, dtype, DF): {rule: "instructions/per-pair"}} from loop_summary's lines."""
    table = collections.defaultdict(dict)
    for line in lines:
        m = re.match(r"\s+(sm_\w+)\s+(\w+::\w+)\s+(\w+)\s+(DF=.*)$", line)
        if not m:
            continue
        for cell in m.group(4).split():
            df, rule_fig = cell.split(",", 1)
            rule, fig = rule_fig.split(":")
            table[(m.group(1), m.group(2), m.group(3), df)][rule] = fig
    return table


def compare(before: dict, after: dict) -> list:
    lines = []
    for key in sorted(set(before) & set(after), key=lambda k: (k[0], k[1], k[2], int(k[3][3:]))):
        old = " ".join(f"{rule}:{fig}" for rule, fig in sorted(before[key].items()))
        new = " ".join(f"{rule}:{fig}" for rule, fig in sorted(after[key].items()))
        lines.append(f"  {key[0]:<7} {key[1]:<28} {key[2]:<5} {key[3]:<6} {old:<16} -> {new}")
    return lines


def check_api(workdir: str) -> str:
    """Syntax-check the bindings against torch's headers; a line saying what happened."""
    try:
        import torch
    except ImportError:
        return "api: skipped (torch is not importable)"
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return "api: skipped (no C++ compiler)"
    # A CPU torch ships the c10/cuda headers without the one CMake generates for CUDA builds: an empty
    # stand-in is enough to parse them.
    stub = os.path.join(workdir, "stub", "c10", "cuda", "impl")
    os.makedirs(stub, exist_ok=True)
    open(os.path.join(stub, "cuda_cmake_macros.h"), "a").close()
    from fused_contrastive.cuda_supcon import toolkit_include_dirs

    lines = []
    for api in sorted(glob.glob(os.path.join(CSRC, "*.cpp"))):
        cmd = [cxx, "-std=c++17", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=_C",
               f"-I{os.path.join(workdir, 'stub')}", f"-I{include}", f"-I{os.path.join(include, 'torch/csrc/api/include')}",
               f"-I{sysconfig.get_paths()['include']}", *(f"-I{d}" for d in toolkit_include_dirs()), f"-I{CSRC}", api]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise subprocess.CalledProcessError(out.returncode, "c++", out.stdout, out.stderr)
        lines.append(f"api: {os.path.basename(api)} parses against torch {torch.__version__}'s headers")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the report here")
    parser.add_argument("--no-api", action="store_true", help="skip the bindings' syntax check")
    parser.add_argument("--csrc", default=CSRC, help="the kernel sources to compile (default: this checkout's csrc/)")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, default %(default)s")
    parser.add_argument("--compare", default=None,
                        help="an earlier report of this script: print its hot-loop figures beside these (before -> after)")
    args = parser.parse_args()
    if shutil.which("nvcc") is None:
        print("cuda-check: nvcc not found; nothing compiled")
        return 0
    nvcc_version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    tool = _cuobjdump()
    sources = sorted(glob.glob(os.path.join(args.csrc, "*.cu")))
    report = [f"CUDA kernels compiled with {nvcc_version}, flags {' '.join(NVCC_FLAGS[:-1])}",
              f"SASS from {tool or 'no cuobjdump (counts skipped)'}", ""]
    summary = []
    with tempfile.TemporaryDirectory() as workdir:
        failed = False
        for source in sources:
            for arch in args.archs.split(","):
                try:
                    cubin, usage = compile_arch(source, arch, workdir)
                except subprocess.CalledProcessError as err:
                    print(f"cuda-check: {os.path.basename(source)} failed for {arch}:\n{err.stderr[-4000:]}")
                    failed = True
                    continue
                mix, loops = sass_mix(cubin, tool) if tool else ({}, {})
                report.append(f"== {os.path.basename(source)} {arch}")
                for kernel in sorted(usage):
                    counts = " ".join(f"{op}={mix.get(kernel, {}).get(op, 0)}" for op in OPCODES)
                    report.append(f"  {kernel:<50} {usage[kernel]}")
                    report.append(f"  {'':<50} SASS: {counts}")
                    loop = loops.get(kernel)
                    if loop:
                        inner = f", {loop['inner_loops']} inner loop(s): a lower bound" if loop["inner_loops"] else ""
                        report.append(f"  {'':<50} hot loop: {loop['instructions']} instructions per tile iteration "
                                      f"(HMMA={loop['hmma']} MUFU={loop['mufu']}{inner}), "
                                      f"{loop['per_pair']:.1f} lane-instructions per logit pair")
                summary.extend(loop_summary(arch, loops))
        if failed:
            return 1
        report.extend(["", "Hot loop per kernel (instructions per tile iteration / lane-instructions per pair), "
                       "by arch, D width and positive rule:", *summary])
        if args.compare:
            report.extend(["", f"Before ({args.compare}) -> after, instructions per tile iteration / lane-instructions "
                           "per pair; a kernel without a rule argument ran every rule through one loop:",
                           *compare(parse_summary(open(args.compare).read().splitlines()), parse_summary(summary))])
        if not args.no_api:
            try:
                report.append("")
                report.append(check_api(workdir))
            except subprocess.CalledProcessError as err:
                print(f"cuda-check: the bindings do not compile:\n{err.stderr[-4000:]}")
                return 1
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
