"""Every shipped Triton config compiles ahead of time for sm_80 and sm_90 (no GPU needed) without
register spills, and its matrix products land on tensor cores (mma.sync / wgmma); the compiled code is
what the JIT would run (the same argument specialisation as a real launch).

It runs in a subprocess: this test session decorates the kernels for the interpreter."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CASES = [f"{arch}:{dtype}:{dim}" for arch in (80, 90)
         for dtype, dim in (("bfloat16", 128), ("bfloat16", 512), ("float16", 64), ("float32", 33))]
CASES += ["90:bfloat16:128:in", "80:bfloat16:512:in"]  # SupCon L_in carries a second online LSE
CASES += ["90:bfloat16:128:bias", "80:bfloat16:512:bias"]  # a denominator bias table (DCL, BCL, spread, MoCo)
# Row formulas: epsilon-SupInfoNCE's second pass, debiased's scaled terms, hard negatives' two extra LSEs.
CASES += ["90:bfloat16:128:eps:bias", "80:float16:512:eps:bias", "90:bfloat16:512:debiased:bias",
          "80:bfloat16:128:debiased_hard:bias", "90:bfloat16:512:debiased_hard:bias"]


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("arch", [80, 90])
def test_shipped_configs_compile_without_spills(arch):
    """Every case of one architecture in one subprocess (its start, importing torch and Triton, costs more
    than a case's compiles); a flawed config is marked in the rows the assertion shows."""
    cases = [case for case in CASES if case.startswith(f"{arch}:")]
    out = _run(["-m", "fused_contrastive.triton_kernels.aot", "--cases", ",".join(cases)])
    rows = [line for line in out.stdout.splitlines() if "regs" in line]
    assert rows, out.stdout + out.stderr[-3000:]
    assert out.returncode == 0, "\n".join(row for row in rows if "<--" in row) + out.stderr[-3000:]


SPECIALISATION = """
from fused_contrastive.triton_kernels import aot
for kernel, mask in (("fwd", False), ("bwd_dq", True), ("bwd_dk", False)):
    cfg = aot.shipped_configs(kernel, 128, "bfloat16", 90)[-1]
    kwargs = aot.example_kwargs(kernel, aot.example_spec("bfloat16", 128, use_mask=mask), cfg)
    src, _, _ = aot.jit_source(aot.KERNELS[kernel], 90, kwargs, cfg.num_warps, cfg.num_stages)
    names = list(aot.KERNELS[kernel].arg_names)
    const = {names[k[0]]: v for k, v in src.constants.items()}
    divisible = {names[k[0]] for k, v in src.attrs.items() if ["tt.divisibility", 16] in v}
    assert const["stride_qd"] == 1 and const["stride_kd"] == 1, const
    assert {"Q", "K", "stride_qm", "stride_km", "D"} <= divisible, divisible
    assert (kernel != "bwd_dq") or {"MASK", "stride_mm"} <= divisible, divisible
print("ok")
"""


def test_aot_specialises_like_the_jit():
    """At D = 128 the feature stride 1 is a compile-time constant and the pointers, row strides and D carry
    tt.divisibility = 16, as Triton's launcher classes them (vector loads); the old hand-built signature had
    neither and compiled scalar loads with far more registers."""
    out = _run(["-c", SPECIALISATION])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]


SASS_LOOP = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0120*/                   MUFU.EX2 R3, R2 ;
        /*0130*/                   NOP ;
        /*0140*/              @!P2 BRA `(.L_x_1) ;
.L_x_0:
        /*0150*/              @!P0 EXIT ;
.L_x_2:
        /*0160*/                   BRA `(.L_x_2);
"""


def test_sass_loop_finder():
    """The back edge (a branch to an earlier label) bounds the tile loop; NOPs and the trailing self-loop
    (no matrix instruction) do not count."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        import sass_per_pair
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.pop(0)
    loops = sass_per_pair.tile_loops(SASS_LOOP)
    assert [(lp.start, lp.end, lp.instructions) for lp in loops] == [(0x110, 0x140, 3)]
    assert sass_per_pair.per_pair(3, 64, 64, 4) == 3 * 32 / 1024


def test_sass_per_pair_one_config():
    """bench/sass_per_pair.py compiles one shipped config as the JIT would and finds its tile loop."""
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "sass_per_pair.py")
    out = _run([script, "--arch", "90", "--variants", "labels", "--kernels", "fwd", "--configs", "1"])
    rows = [line for line in out.stdout.splitlines() if line.startswith("fwd")]
    assert out.returncode == 0 and len(rows) == 1 and "per_pair" in rows[0], out.stdout + out.stderr[-3000:]
    assert 0 < float(rows[0].split("per_pair")[1].split()[0]) < 100, rows[0]
