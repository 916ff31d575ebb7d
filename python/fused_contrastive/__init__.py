"""Fused, memory-efficient contrastive losses (SupCon, SimCLR/NT-Xent, ...).

Backends: ``reference`` (naive, exact: the oracle), ``chunked`` (tiled PyTorch,
any device), ``triton`` and ``cuda`` (fused kernels). ``backend="auto"`` picks the
best one that can run the input; ``explain_backends`` says why the others cannot.
"""
from .dispatch import BACKEND_CHOICES
from .losses import SupConLoss, supcon_loss, supcon_spec

__version__ = "0.1.0"


def explain_backends(features, labels=None, mask=None, **loss_kwargs) -> dict:
    """For a SupCon call with these arguments: each backend -> None if it can run, else the reason."""
    from .dispatch import explain

    return explain(supcon_spec(features, labels, mask, **loss_kwargs))


__all__ = ["SupConLoss", "supcon_loss", "explain_backends", "BACKEND_CHOICES", "__version__"]
