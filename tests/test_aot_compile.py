"""Every shipped Triton config compiles ahead of time for sm_80 and sm_90 (no GPU needed) without
register spills, and its matrix products land on tensor cores (mma.sync / wgmma).

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


@pytest.mark.parametrize("case", CASES)
def test_shipped_configs_compile_without_spills(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "fused_contrastive.triton_kernels.aot", "--cases", case],
                         capture_output=True, text=True, env=env)
    rows = [line for line in out.stdout.splitlines() if "regs" in line]
    assert rows, out.stdout + out.stderr[-3000:]
    assert out.returncode == 0, "\n".join(rows) + out.stderr[-3000:]
