"""CI's rehearsal of bench/gpu_suite.sh: the same script on CPU (REHEARSAL=1: Triton's interpreter, tiny
sizes, the providers that exist here), so that a missing import, a renamed flag, a wheel not carried or a
step that writes nothing shows up here and not in the few minutes of a lent GPU."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import timing  # noqa: E402

# One file per step (smoke.txt holds both smoke steps), all that a lent machine sends back (8 at most).
FILES = {"environment": "environment.txt", "install": "install.log", "cuda_build": "cuda_build.log",
         "smoke": "smoke.txt", "smoke_cuda": "smoke.txt", "headline": "headline.md", "tests": "tests.txt"}
# CI's bound, on its unloaded 2-core machine (the suite stops itself at its budget). A machine already
# busier than its cores (a shared developer machine) gets proportionally more, so that load is not
# mistaken for a broken step.
BUDGET_S = int(min(300, 85 * max(1.0, (timing.load_average() or [0])[0] / (os.cpu_count() or 1))))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "out"
    env = {**os.environ, "REHEARSAL": "1", "PYTHON": sys.executable, "SUITE_BUDGET_S": str(BUDGET_S)}
    started = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=BUDGET_S + 60)
    return out, proc, time.monotonic() - started


@pytest.mark.slow
def test_rehearsal_every_step_writes_its_file(rehearsal):
    out, proc, elapsed = rehearsal
    log = (out / "suite.log").read_text()
    names = sorted(os.listdir(out))
    assert names == sorted(set(FILES.values()) | {"suite.log", "headline.json"}), proc.stdout[-3000:]
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    for step, name in FILES.items():
        assert (out / name).stat().st_size > 0, f"{step} wrote an empty {name}"
        code = re.search(rf"^step {step}: exit (\d+)", log, re.M)
        assert code, f"no end line for step {step}:\n{log[-3000:]}"
        # The smoke exits 1 when a case fails: that is a finding of the run, not a broken script.
        assert int(code.group(1)) in ((0, 1) if step == "smoke" else (0,)), f"step {step}:\n{log[-3000:]}"
    assert elapsed < BUDGET_S + 15, f"the rehearsal took {elapsed:.0f} s"


@pytest.mark.slow
def test_rehearsal_results_are_complete(rehearsal):
    out = rehearsal[0]
    smoke = (out / "smoke.txt").read_text()
    summaries = re.findall(r"^SUMMARY (\S+) on cpu: (\d+) cases: (\d+) passed, (\d+) failed, (\d+) n/a, (\d+) not run",
                           smoke, re.M)
    assert [s[0] for s in summaries] == ["triton,chunked", "cuda"], smoke[-2000:]
    assert int(summaries[0][2]) > 0 and int(summaries[1][4]) == int(summaries[1][1])  # no cuda on CPU: all n/a
    install = (out / "install.log").read_text()
    for pin in ("inf_cl-1.2.1", "memeff-0.3.1"):
        assert re.search(rf"^wheel {pin}: (not carried|installed from)", install, re.M), install
    data = json.loads((out / "headline.json").read_text())
    assert data["gemm"]["tflops"] > 0
    supcon = {r["provider"]: r["status"] for r in data["supcon"]}
    assert supcon["triton"] == supcon["chunked"] == supcon["supcontrast"] == "ok", supcon
    assert supcon["cuda"].startswith("skipped") and supcon["supcontrast-compiled"].startswith("skipped")
    clip = {r["provider"]: r["status"] for r in data["clip"]}
    assert clip["clip:triton"] == "ok", clip
    for other in ("infcl-clip", "memeff-clip"):  # not carried here, or carried but CUDA-only
        assert re.match(r"skipped: .*(not installed \(not carried|CUDA devices only)", clip[other]), clip
    assert data["largest_n"] and data["largest_n"][0]["status"] == "ok", data["largest_n"]
    siglip = {r["provider"]: r["status"] for r in data["siglip"]}
    assert siglip["siglip:triton"] == siglip["siglip:chunked"] == "ok", siglip
    assert siglip["open_clip-siglip"] == "ok" or siglip["open_clip-siglip"].startswith("skipped"), siglip
    assert data["largest_n_siglip"] and data["largest_n_siglip"][0]["status"] == "ok", data["largest_n_siglip"]
    assert re.search(r"\d+ skipped", (out / "tests.txt").read_text())


def test_timing_measures_forward_and_backward_apart():
    import torch

    class SlowBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            time.sleep(0.05)
            return x.sum()

        @staticmethod
        def backward(ctx, grad):
            time.sleep(0.1)
            return grad.expand(8)

    x = torch.randn(8, requires_grad=True)
    result = timing.measure(lambda: (SlowBackward.apply(x), (x,)), cuda=False, budget_s=2.0, min_reps=3, max_reps=4)
    assert 3 <= result["fwd"]["n"] == result["bwd"]["n"] <= 4
    # Lower bounds only (a loaded machine can only add time): each part holds its own sleep.
    assert result["fwd"]["min"] >= 0.05 and result["bwd"]["min"] >= 0.1
    assert result["fwd_bwd"]["min"] >= result["fwd"]["min"] + result["bwd"]["min"] - 1e-9
    assert x.grad is None and result["loss"] == pytest.approx(float(x.sum()), rel=1e-6)
    stats = timing.summary([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (stats["min"], stats["median"], stats["q20"], stats["q80"]) == (1.0, 3.0, 1.8, 4.2)
    assert timing.noise(stats) == pytest.approx(0.8) and timing.noise(timing.summary([1.0])) is None
