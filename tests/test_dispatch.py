"""Backend choice and the reasons a backend gives for not running."""
import os
import subprocess
import sys

import pytest
import torch

import fused_contrastive as fc
from fused_contrastive import dispatch
from fused_contrastive.losses import supcon_spec

F = torch.randn(6, 2, 5, requires_grad=True)
L = torch.tensor([0, 1, 2, 0, 1, 2])


def test_auto_picks_chunked_on_cpu_and_explains_the_rest():
    reasons = fc.explain_backends(F, L)
    assert reasons["chunked"] is None and reasons["reference"] is None
    assert "cpu" in reasons["cuda"]
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "cpu" in reasons["triton"]
    spec = supcon_spec(F, L)
    assert dispatch.select(spec).name == "chunked"  # even when the interpreter could run triton


def test_triton_runs_cpu_tensors_only_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "cpu" in fc.explain_backends(F, L)["triton"]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_explicit_backend_that_cannot_run_raises_its_reason(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = fc.explain_backends(F, L)[backend]
    with pytest.raises(RuntimeError, match=backend) as err:
        fc.supcon_loss(F, L, backend=backend)
    assert reason in str(err.value)


def test_environment_variable_overrides_auto(monkeypatch):
    from fused_contrastive import chunked, reference

    calls = []
    monkeypatch.setattr(reference, "loss", lambda spec: calls.append("reference") or torch.zeros(()))
    monkeypatch.setattr(chunked, "loss", lambda spec: calls.append("chunked") or torch.zeros(()))
    from fused_contrastive import dispatch

    monkeypatch.setitem(dispatch.BACKENDS, "reference", dispatch.Backend("reference", reference.why_not, reference.loss))
    monkeypatch.setitem(dispatch.BACKENDS, "chunked", dispatch.Backend("chunked", chunked.why_not, chunked.loss))
    fc.supcon_loss(F, L)
    monkeypatch.setenv("FUSED_CONTRASTIVE_BACKEND", "reference")
    fc.supcon_loss(F, L)
    fc.supcon_loss(F, L, backend="chunked")  # an explicit choice beats the environment
    assert calls == ["chunked", "reference", "chunked"]
    monkeypatch.setenv("FUSED_CONTRASTIVE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        fc.supcon_loss(F, L)
    monkeypatch.setenv("FUSED_CONTRASTIVE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FUSED_CONTRASTIVE_BACKEND"):
        fc.supcon_loss(F, L)


def test_info_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "fused_contrastive.info"], capture_output=True, text=True, check=True)
    for name in ("torch", "triton", "reference", "chunked", "cuda", "auto"):
        assert name in out.stdout
    assert "chunked    available" in out.stdout


def test_cuda_backend_says_what_its_kernels_do_not_cover():
    import dataclasses

    from fused_contrastive import cuda_supcon
    from fused_contrastive.family import _without_positives

    bf16 = F.detach().to(torch.bfloat16)
    assert cuda_supcon.unsupported(supcon_spec(bf16, L)) is None  # L_out with labels: covered
    assert cuda_supcon.unsupported(supcon_spec(bf16, mask=torch.eye(6))) is None
    assert "'in'" in cuda_supcon.unsupported(supcon_spec(bf16, L, variant="in"))
    spec = supcon_spec(bf16, L)
    assert "bias" in cuda_supcon.unsupported(dataclasses.replace(spec, den_bias=_without_positives(spec)))
    assert "float64" in cuda_supcon.unsupported(supcon_spec(F.detach().double(), L))
    assert "300 > 256" in cuda_supcon.unsupported(supcon_spec(torch.randn(6, 2, 300, dtype=torch.bfloat16), L))
    assert "200 > 128" in cuda_supcon.unsupported(supcon_spec(torch.randn(6, 2, 200), L))
    assert "cpu" in cuda_supcon.why_not(spec)  # the device is the first reason, before any build


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch may build the extension")
def test_cuda_extension_reports_why_it_is_unavailable_on_cpu_torch():
    from fused_contrastive import cuda_supcon

    module, reason = cuda_supcon.extension()
    assert module is None and "CPU-only" in reason
    assert "CPU-only" in cuda_supcon.status()


def test_auto_takes_cuda_only_where_a_benchmark_showed_it_faster(monkeypatch):
    class OnGpu:  # the auto rule reads only the device
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(dispatch, "CUDA_FASTER_THAN_TRITON", {})
    assert "auto prefers triton on compute capability 9.x" in dispatch._cuda_auto_why_not(OnGpu())
    monkeypatch.setattr(dispatch, "CUDA_FASTER_THAN_TRITON", {9: "bench/results/gpu_x.md"})
    assert dispatch._cuda_auto_why_not(OnGpu()) is None
