"""``python -m fused_contrastive.info``: versions, devices, and which backend can run where."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import __version__, cuda_supcon, dispatch
from .losses import supcon_spec


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [
        f"fused_contrastive {__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, threads: {torch.get_num_threads()})",
        f"triton {_version('triton')}",
        f"CUDA extension: {cuda_supcon.status()}",
        f"numpy {_version('numpy')}",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        lines.append("CUDA devices: none")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        lines.append(f"\n{device} ({name}):")
        spec = supcon_spec(torch.zeros(4, 2, 8, device=device), torch.arange(4, device=device) % 2)
        try:
            chosen = dispatch.select(spec).name
        except RuntimeError as err:
            chosen = f"none ({err})"
        for backend, reason in dispatch.explain(spec).items():
            lines.append(f"  {backend:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        lines.append(f"  auto       -> {chosen}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
