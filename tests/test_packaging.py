"""The wheel holds the package and its Triton kernels; the CUDA build is skipped with one line."""
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contents_and_cuda_skip_line(tmp_path):
    env = dict(os.environ, FUSED_CONTRASTIVE_SKIP_CUDA_BUILD="1")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path), ROOT],
        capture_output=True, text=True, env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "skipping the optional CUDA extension: FUSED_CONTRASTIVE_SKIP_CUDA_BUILD=1" in out.stdout + out.stderr
    (wheel,) = tmp_path.glob("fused_contrastive-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("__init__.py", "losses.py", "chunked.py", "reference.py", "dispatch.py", "info.py", "siglip.py",
                   "triton_kernels/siglip.py",
                   "triton_kernels/__init__.py", "cuda_supcon.py", "fused.py", "csrc/supcon.cu", "csrc/supcon_api.cpp",
                   "csrc/supcon_kernels.cuh", "csrc/supcon_params.h", "compat/__init__.py", "compat/pml.py",
                   "compat/open_clip.py", "compat/lightly.py"):
        assert f"fused_contrastive/{module}" in names
