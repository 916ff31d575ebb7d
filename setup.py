"""Build script. The CUDA extension is optional: it is built only when a CUDA-enabled
torch and a CUDA toolkit are present at build time and csrc/ has sources;
FUSED_CONTRASTIVE_SKIP_CUDA_BUILD=1 skips it. Everything else is pure Python."""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA build, or ([], {}) with one line saying why not."""
    reason = None
    if os.environ.get("FUSED_CONTRASTIVE_SKIP_CUDA_BUILD") == "1":
        reason = "FUSED_CONTRASTIVE_SKIP_CUDA_BUILD=1"
    else:
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
        except ImportError:
            torch = None
            reason = "torch is not importable at build time (install torch first, then use --no-build-isolation)"
        if reason is None and torch.version.cuda is None:
            reason = "torch is a CPU-only build"
        elif reason is None and CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if reason is None and not sources:
        reason = "csrc/ has no kernel sources in this version"
    if reason is not None:
        print(f"fused_contrastive: skipping the optional CUDA extension: {reason}")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    ext = CUDAExtension(
        "fused_contrastive._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="fused_contrastive",
    version="0.1.0",
    description="Fused, memory-efficient contrastive losses (SupCon, SimCLR, ...) for PyTorch",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # csrc/ travels in the wheel too, so that a wheel built without CUDA can still JIT-build the kernels.
    packages=["fused_contrastive", "fused_contrastive.compat", "fused_contrastive.triton_kernels",
              "fused_contrastive.csrc"],
    package_dir={"fused_contrastive": "python/fused_contrastive",
                 "fused_contrastive.triton_kernels": "triton_kernels",
                 "fused_contrastive.csrc": "csrc"},
    package_data={"fused_contrastive.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp", "README.md"]},
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        # ninja: torch's JIT builds (the CUDA extension on first use; its CPU emulation in the tests).
        # pytorch-metric-learning: tests/test_compat.py compares the pml drop-ins with it.
        "test": ["pytest", "hypothesis", "scikit-learn", "triton>=3.6", "ninja", "pytorch-metric-learning"],
        "bench": ["matplotlib", "tqdm", "pytorch-metric-learning"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
