"""Backend registry. Each backend answers "why can't I run this spec?" (None means it can).

``auto`` walks the backends in order of preference and takes the first that can run;
an explicitly requested backend that cannot run raises with its reason. The
environment variable ``FUSED_CONTRASTIVE_BACKEND`` replaces ``auto`` by a fixed choice.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import chunked, cuda_supcon, reference, soft_targets
from .spec import ContrastSpec

ENV_VAR = "FUSED_CONTRASTIVE_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    why_not: Callable[[ContrastSpec], Optional[str]]
    loss: Callable[[ContrastSpec], Tensor]
    # (loss, dQ, dK, dtau) without autograd, for torch.compile's custom op; None: eager only.
    loss_and_grads: Optional[Callable] = None
    # Devices on which ``auto`` considers it. Triton can run CPU tensors under TRITON_INTERPRET=1,
    # but that is a debugging mode, far slower than chunked: only an explicit request uses it.
    auto_devices: tuple = ("cpu", "cuda")
    # Ring mode's per-shard operations (RingOps); None: gather mode only.
    ring: Optional[tuple] = None
    # Why ``auto`` passes over it although it could run (asked before why_not, which may build things).
    auto_why_not: Optional[Callable[[ContrastSpec], Optional[str]]] = None


def triton_kernels(name: str = "supcon"):
    """(the Triton kernels' module ``triton_kernels/<name>.py``, None), or (None, the reason it cannot be used):
    every loss family's Triton backend asks here."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed (pip install 'fused_contrastive[triton]')"
    try:
        module = importlib.import_module(f"{__package__}.triton_kernels.{name}")
    except Exception as err:  # a broken or too old Triton: say so instead of failing the loss
        return None, f"importing the Triton kernels failed: {type(err).__name__}: {err}"
    return module, None


_triton_module = triton_kernels


def _triton_why_not(spec: ContrastSpec) -> Optional[str]:
    module, reason = _triton_module()
    return reason if module is None else module.why_not(spec)


def _triton_loss(spec: ContrastSpec) -> Tensor:
    return _triton_module()[0].loss(spec)


def _triton_loss_and_grads(spec: ContrastSpec):
    return _triton_module()[0].loss_and_grads(spec)


def _triton_row_stats(spec: ContrastSpec):
    return _triton_module()[0].row_stats(spec)


def _triton_grads_from_stats(spec: ContrastSpec, lse, coef, pos_scale, den_scale):
    return _triton_module()[0].grads_from_stats(spec, lse, coef, pos_scale, den_scale)


def _triton_soft():
    from .triton_kernels import soft

    return soft


def _triton_soft_norm(spec: ContrastSpec):
    return _triton_soft().soft_norm(spec)


def _triton_soft_stats(spec: ContrastSpec, norm, pos_count):
    return _triton_soft().soft_stats(spec, norm, pos_count)


def _triton_soft_grads(spec: ContrastSpec, lse, norm, pos_count, coef):
    return _triton_soft().soft_grads(spec, lse, norm, pos_count, coef)


class RingOps(NamedTuple):
    """Ring mode's per-shard operations (fused_contrastive.distributed): ``row_stats(spec) -> (lse, pos_stat,
    pos_aux)`` over one key shard; ``eps_terms(spec, lse_n) -> (pos_sum, R)``, epsilon-SupInfoNCE's positive
    terms given the merged LSE_N; ``grads_from_stats(spec, lse, coef, pos_scale, den_scale) -> (dQ, dK)`` of
    the shard's tiles from the merged row factors. Soft per-pair targets (SCE, CoMatch; soft_targets.py):
    ``soft_norm(spec) -> norm``, ``soft_stats(spec, norm, pos_count) -> (lse, wsum)``, ``soft_grads(spec, lse,
    norm, pos_count, coef) -> (dQ, dK)``; None: no ring mode for them on that backend."""
    row_stats: Callable
    grads_from_stats: Callable
    eps_terms: Callable = chunked.eps_terms  # tiles in torch: the fused kernels' second pass uses their own LSE
    soft_norm: Optional[Callable] = None
    soft_stats: Optional[Callable] = None
    soft_grads: Optional[Callable] = None


# GPU generations (compute capability major) on which a benchmark in bench/results/ measured the CUDA
# kernels faster than Triton's, with the result file that shows it. ``auto`` takes cuda only there:
# empty until the CUDA kernels have been benchmarked on a GPU.
CUDA_FASTER_THAN_TRITON: dict[int, str] = {}


def _cuda_auto_why_not(spec: ContrastSpec) -> Optional[str]:
    if spec.device.type != "cuda":
        return None  # why_not says why
    major = torch.cuda.get_device_capability(spec.device)[0]
    if major in CUDA_FASTER_THAN_TRITON:
        return None
    return (f"auto prefers triton on compute capability {major}.x: no benchmark in bench/results/ shows the CUDA "
            "kernels faster there (request backend='cuda' to use them)")


# Order of preference for ``auto``; reference is the oracle and is never chosen by ``auto``.
BACKENDS: dict[str, Backend] = {
    "cuda": Backend("cuda", cuda_supcon.why_not, cuda_supcon.loss, cuda_supcon.loss_and_grads, auto_devices=("cuda",),
                    ring=RingOps(cuda_supcon.row_stats, cuda_supcon.grads_from_stats), auto_why_not=_cuda_auto_why_not),
    "triton": Backend("triton", _triton_why_not, _triton_loss, _triton_loss_and_grads, auto_devices=("cuda",),
                      ring=RingOps(_triton_row_stats, _triton_grads_from_stats, soft_norm=_triton_soft_norm,
                                   soft_stats=_triton_soft_stats, soft_grads=_triton_soft_grads)),
    "chunked": Backend("chunked", chunked.why_not, chunked.loss, chunked.loss_and_grads,
                       ring=RingOps(chunked.row_stats, chunked.grads_from_stats, chunked.eps_terms,
                                    soft_targets.soft_norm, soft_targets.soft_stats, soft_targets.soft_grads)),
    "reference": Backend("reference", reference.why_not, reference.loss,
                         ring=RingOps(reference.row_stats, reference.grads_from_stats, reference.eps_terms,
                                      soft_targets.dense_soft_norm, soft_targets.dense_soft_stats,
                                      soft_targets.dense_soft_grads)),
}
AUTO_ORDER = ("cuda", "triton", "chunked")
BACKEND_CHOICES = ("auto",) + tuple(BACKENDS)


def explain(spec: ContrastSpec) -> dict[str, Optional[str]]:
    """Every backend with the reason it cannot run this spec (None: it can)."""
    return {name: b.why_not(spec) for name, b in BACKENDS.items()}


def select(spec: ContrastSpec, backend: str = "auto") -> Backend:
    return choose(spec, backend, BACKENDS, AUTO_ORDER, spec.device)


def choose(spec, backend: str, backends: dict, auto_order: tuple, device: torch.device):
    """The backend of ``backends`` that runs ``spec``: an explicit one that cannot raises its reason; ``auto``
    takes the first of ``auto_order`` that can (and that ``auto`` considers for ``device``); the environment
    variable replaces ``auto``. Shared by every loss's backend table (SigLIP has its own)."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            if forced not in backends:
                raise ValueError(f"{ENV_VAR} must be one of {BACKEND_CHOICES}, got {forced!r}")
            backend = forced
    if backend != "auto":
        reason = backends[backend].why_not(spec)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} cannot run this input: {reason}")
        return backends[backend]
    reasons = {}
    for name in auto_order:
        candidate = backends[name]
        auto_why_not = getattr(candidate, "auto_why_not", None)
        reason = (auto_why_not(spec) if auto_why_not is not None else None) or candidate.why_not(spec)
        if reason is None and device.type not in candidate.auto_devices:
            reason = f"auto does not use it for {device.type} tensors (request it explicitly)"
        if reason is None:
            return candidate
        reasons[name] = reason
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise RuntimeError(f"no backend can run this input ({detail})")


def run(spec: ContrastSpec, backend: str = "auto") -> Tensor:
    chosen = select(spec, backend)
    # Autocast would run the backends' products in bf16/fp16; they choose their own precision.
    with torch.autocast(spec.device.type, enabled=False):
        return chosen.loss(spec)
