"""SupCon / SimCLR on the native CUDA kernels of ``csrc/`` (L_out with labels or a dense mask, any self
offset, extra keys): the extension loader, the reasons it cannot run a spec, and the two launchers that
``fused.py``'s shared autograd.Function calls.

The extension is ``fused_contrastive._C`` when ``setup.py`` built it (a CUDA toolkit and a CUDA torch at
install time), else it is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja; cached
under torch's extension directory, so only the first process pays the minute of nvcc).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Optional

import torch

from . import fused, soft_targets
from .spec import ContrastSpec, normalize_rows

_HERE = os.path.dirname(os.path.abspath(__file__))
# A wheel carries the sources as fused_contrastive/csrc; a source checkout has them at its root.
CSRC = next((d for d in (os.path.join(_HERE, "csrc"), os.path.join(_HERE, "..", "..", "csrc"))
             if glob.glob(os.path.join(d, "*.cu"))), os.path.join(_HERE, "csrc"))
DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MAX_D = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}  # as csrc's max_dim; checked there too
MIN_CAPABILITY = (8, 0)  # bf16 tensor-core MMA
# fp16/bf16 inputs run the register-tile kernels (mma.sync); "wmma" selects the shared-memory-tile ones
# that fp32 always uses, so that one build can benchmark both.
KERNELS_ENV = "FUSED_CONTRASTIVE_CUDA_KERNELS"


def _wmma() -> bool:
    choice = os.environ.get(KERNELS_ENV, "mma")
    if choice not in ("mma", "wmma"):
        raise ValueError(f"{KERNELS_ENV} must be 'mma' or 'wmma', got {choice!r}")
    return choice == "wmma"


# The JIT build compiles for TORCH_CUDA_ARCH_LIST when set, else for the GPU in hand (torch's rule).
CUDA_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def toolkit_include_dirs() -> list:
    """The CUDA toolkit's header directories as nvcc itself uses them (its wrapper scripts and the
    targets/ layout hide them from a plain CUDA_HOME/include), or [] without nvcc."""
    import re
    import shutil
    import subprocess

    if shutil.which("nvcc") is None:
        return []
    dryrun = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    return re.findall(r'-I"?([^"\s]+)', "".join(line for line in dryrun.splitlines() if "INCLUDES=" in line))


def _prebuilt():
    try:
        from . import _C  # built by setup.py

        return _C
    except ImportError:
        return None


def _sources():
    return sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "*.cu")))


def _cannot_build() -> Optional[str]:
    """Why the extension cannot be JIT-built here (None: it can), without building it."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build (the CUDA extension needs a CUDA torch)"
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja): the CUDA extension is built with it on first use"
    if CUDA_HOME is None:
        return "no CUDA toolkit found to build the extension (set CUDA_HOME, or install with one present)"
    if not _sources():
        return f"the CUDA sources are not installed (looked in {CSRC}); use an editable install or a wheel built with CUDA"
    return None


def status() -> str:
    """One line for ``python -m fused_contrastive.info``; builds nothing."""
    if _prebuilt() is not None:
        return "built at install (fused_contrastive._C)"
    if extension.cache_info().currsize:
        module, reason = extension()
        return "built on first use (JIT)" if module is not None else f"unavailable: {reason}"
    reason = _cannot_build()
    return "not built yet: the first backend='cuda' call compiles it (about a minute)" if reason is None else (
        f"unavailable: {reason}")


@functools.lru_cache(maxsize=None)
def extension():
    """(module, None) or (None, why it is unavailable). Builds at most once per process."""
    module = _prebuilt()
    if module is not None:
        return module, None
    reason = _cannot_build()
    if reason is not None:
        return None, reason
    from torch.utils.cpp_extension import load

    sources = _sources()
    try:
        module = load(name="fused_contrastive_cuda", sources=sources, extra_include_paths=[CSRC],
                      extra_cflags=["-O3"], extra_cuda_cflags=CUDA_FLAGS, verbose=False)
    except Exception as err:  # a failed build must not break the other backends
        return None, f"building the CUDA extension failed: {type(err).__name__}: {str(err)[-500:]}"
    return module, None


def unsupported(spec: ContrastSpec) -> Optional[str]:
    """What the kernels do not cover, from the spec alone (no device, no build)."""
    if spec.soft_target is not None:
        return soft_targets.why_not_fused(spec)
    if spec.variant != "out":
        return f"no CUDA kernel for the row formula {spec.variant!r} (L_out only; use triton or chunked)"
    if spec.den_bias is not None:
        return "no CUDA kernel for denominator bias tables (DCL, InfoNCE queue, CLIP, BCL); use triton or chunked"
    dtype = spec.keys.dtype
    if dtype not in DTYPES:
        return f"{dtype} inputs: the CUDA kernels take float32, float16 or bfloat16"
    if spec.keys.shape[1] > MAX_D[dtype]:
        return (f"feature dimension {spec.keys.shape[1]} > {MAX_D[dtype]} for {dtype}: whole padded rows of a "
                "64-row tile sit in shared memory")
    if max(spec.num_anchors, spec.num_keys) >= 2**31:
        return "2^31 or more anchors or keys"
    return None


def why_not(spec: ContrastSpec) -> Optional[str]:
    if spec.device.type != "cuda":
        return f"inputs are on {spec.device.type}; the CUDA extension needs a CUDA device"
    reason = unsupported(spec)
    if reason is not None:
        return reason
    if torch.cuda.get_device_capability(spec.device) < MIN_CAPABILITY:
        return "the CUDA kernels need compute capability 8.0 or newer (bf16 tensor-core MMA)"
    module, reason = extension()
    if module is None:
        return reason
    need = max(module.shared_bytes(k, DTYPES[spec.keys.dtype], spec.keys.shape[1]) for k in range(3))
    have = torch.cuda.get_device_properties(spec.device).shared_memory_per_block_optin
    if need > have:
        return f"a block needs {need} bytes of shared memory; this GPU offers {have} per block"
    return None


# ----------------------------------------------------------------------------- launchers


def _unit_stride_rows(x):
    """x with unit stride along D, as the kernels read rows. A tensor with D = 1 counts as contiguous
    whatever its last stride, so .contiguous() would return it unchanged: there the stride is simply
    restated as 1 (a view: with one column it is never used to step)."""
    if x.stride(-1) == 1:
        return x
    if x.shape[-1] == 1:
        return x.as_strided(x.shape, (x.stride(0), 1))
    return x.contiguous()


def _kernel_mask(mask):
    """The dense mask as the kernels read it: bytes for a 0/1 mask (the spec's uint8 or a bool), else fp32
    weights; with unit column stride (a transposed mask is copied)."""
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    elif mask.dtype != torch.uint8:
        mask = mask.to(torch.float32)
    return mask if mask.stride(-1) == 1 else mask.contiguous()


def _prepared(spec: ContrastSpec) -> ContrastSpec:
    """The spec with its mask in the kernels' form, made once per loss call rather than in every launcher
    (the forward and the backward both read it)."""
    if spec.mask is None:
        return spec
    mask = _kernel_mask(spec.mask)
    return spec if mask is spec.mask else dataclasses.replace(spec, mask=mask)


def _kernel_args(spec: ContrastSpec, Q, K):
    """(anchors, keys) as the kernels read them, and the positive rule's tensors."""
    if spec.normalize:  # the kernels take the normalised rows; fused.py chains the gradient through x / |x|
        K = normalize_rows(K, torch.float32).to(K.dtype)
        Q = K if Q is spec.keys else normalize_rows(Q, torch.float32).to(Q.dtype)
    Q, K = _unit_stride_rows(Q), _unit_stride_rows(K)
    if spec.mask is not None:
        labels = dict(anchor_labels=None, key_labels=None, mask=_kernel_mask(spec.mask))  # as is once prepared
    else:
        labels = dict(anchor_labels=spec.anchor_labels.to(torch.int64).contiguous(),
                      key_labels=spec.key_labels.to(torch.int64).contiguous(), mask=None)
    return Q, K, labels


def forward_stats(spec: ContrastSpec, Q, K, inv_tau):
    """(lse, pos_sum, pos_aux) per anchor, fp32; L_out has no auxiliary statistic (pos_aux is lse)."""
    Q, K, labels = _kernel_args(spec, Q, K)
    lse, pos_sum = extension()[0].forward(Q, K, inv_tau.to(torch.float32), self_offset=spec.self_offset,
                                          wmma=_wmma(), **labels)
    return lse, pos_sum, lse


def backward_grads(spec: ContrastSpec, Q, K, inv_tau, rows, need_dq=True, need_dk=True):
    """dQ and dK (input dtype) for the per-row backward factors ``rows``, recomputing every tile from lse."""
    Q, K, labels = _kernel_args(spec, Q, K)
    f32 = torch.float32
    return extension()[0].backward(Q, K, inv_tau.to(f32), self_offset=spec.self_offset, lse=rows.lse.to(f32),
                                   coef=rows.coef.to(f32), pos_scale=rows.pos_scale.to(f32), need_dq=need_dq,
                                   need_dk=need_dk, wmma=_wmma(), **labels)


# ----------------------------------------------------------------------------- API (autograd shared in fused.py)

KERNELS = fused.Kernels("cuda", forward_stats, backward_grads)


def loss(spec: ContrastSpec):
    return fused.loss(_prepared(spec), KERNELS)


def loss_and_grads(spec: ContrastSpec):
    return fused.loss_and_grads(_prepared(spec), KERNELS)


def row_stats(spec: ContrastSpec):
    return fused.row_stats(_prepared(spec), KERNELS)


def grads_from_stats(spec: ContrastSpec, lse, coef, pos_scale, den_scale):
    return fused.grads_from_stats(_prepared(spec), lse, coef, pos_scale, den_scale, KERNELS)
