"""lightly drop-ins: ``NTXentLoss``, ``DCLLoss`` and ``DCLWLoss`` (lightly 1.6's constructors, ``forward(out0,
out1)`` and results), computed by this package's losses.

* ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``: ``out0`` and ``out1`` are
  L2-normalised. Without a bank: SimCLR's NT-Xent over the 2B views, every other view a negative, mean over
  the 2B anchors (``supcon_loss(stack([out0, out1], 1), normalize=True)``). With a bank
  (``memory_bank_size=(size, dim)``; a bare integer other than 0 is refused, as lightly 1.6 does): each
  ``out0`` row against its ``out1`` row and the bank's rows only, mean over B (``info_nce(..., queue=bank,
  in_batch_negatives=False)``). The bank is a ``fused_contrastive.MemoryBank`` that starts, as lightly's,
  full of random unit vectors drawn at construction (``torch.randn((size, dim))``, the same draws); after
  the loss, when ``out0`` requires grad, the normalised ``out1`` rows are written at the pointer, and a
  batch that runs past the end is cut there (its remaining rows are dropped and the pointer returns to 0),
  as lightly does. Differences: the bank's rows are in ``state_dict`` here (lightly's buffer is not
  persistent), and a bank of another dtype than the features is cast (lightly would raise).
* ``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``: ``dcl_loss`` of the normalised
  views (positive out of the denominator, mean over the 2B anchors). ``weight_fn`` must be None (a custom
  weight is not supported); use ``DCLWLoss``.
* ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``: ``dcl_loss(weighted=True)``: the same
  negative von Mises-Fisher weight ``2 - B softmax(cos(out0_b, out1_b) / sigma)``, detached, as lightly.

``gather_distributed=True`` with an initialised process group of more than one rank: the loss of the global
batch on the default group (every rank gets it; gradients world_size x this rank's share, so that DDP's
averaging equals one process). lightly returns this rank's rows' loss instead, whose mean over ranks is ours,
and its gathered gradients equal ours when the ranks' batch sizes are equal. DCLW's weight differs there:
lightly's softmax runs over the local batch (B = local size), ours over the global one. With a memory bank
the loss stays local (as lightly's) and every rank enqueues the gathered batch (lightly's concat_all_gather).
lightly gives -inf for DCL with a batch of 1 (no negatives); here that is a ValueError.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dispatch
from ..family import dcl_loss, info_nce
from ..losses import _check_choice, _check_temperature, supcon_loss
from ..memory import MemoryBank

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss"]


def _group(gather_distributed: bool):
    """The default group when gathering is asked for and more than one rank runs (lightly's dist.world_size)."""
    import torch.distributed as dist

    if gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _check_common(temperature, gather_distributed, backend) -> None:
    _check_temperature("temperature", temperature)
    _check_choice("gather_distributed", gather_distributed, (False, True))
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError("gather_distributed is True but torch.distributed is not available")


def _bank_size(memory_bank_size) -> tuple:
    """lightly 1.6's rule: 0 (no bank) or a (size, dim) pair of non-negative integers."""
    size = (memory_bank_size,) if isinstance(memory_bank_size, numbers.Integral) else tuple(memory_bank_size)
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0 for x in size):
        raise ValueError(f"memory_bank_size must be 0 or a (size, dim) pair of non-negative integers, "
                         f"got {memory_bank_size!r}")
    if size != (0,) and len(size) != 2:
        raise ValueError(f"memory_bank_size must be 0 (no bank) or a (size, dim) pair: the feature dimension "
                         f"cannot be guessed, got {memory_bank_size!r}")
    return size


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss`` (SimCLR, or MoCo with a memory bank); see ``fused_contrastive.compat.lightly``.

    Example:
        >>> import torch
        >>> from fused_contrastive.compat.lightly import NTXentLoss
        >>> loss = NTXentLoss(temperature=0.5)(torch.randn(8, 16), torch.randn(8, 16))
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        _check_common(temperature, gather_distributed, backend)
        size = _bank_size(memory_bank_size)
        self.temperature, self.gather_distributed, self.backend = temperature, gather_distributed, backend
        self.memory_bank = None
        if size[0] > 0:
            self.memory_bank = MemoryBank(size[0], size[1])
            # lightly draws its initial bank here, at construction: the same draws leave the same bank.
            self.memory_bank.enqueue(F.normalize(torch.randn(size), dim=-1))

    def extra_repr(self) -> str:
        bank = 0 if self.memory_bank is None else (self.memory_bank.size, self.memory_bank.dim)
        return f"temperature={self.temperature}, memory_bank_size={bank}, " \
               f"gather_distributed={self.gather_distributed}, backend={self.backend!r}"

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank is None:
            features = torch.stack([out0, out1], dim=1) if isinstance(out0, Tensor) and isinstance(out1, Tensor) \
                and out0.shape == out1.shape and out0.dim() == 2 else None
            if features is None:
                raise ValueError("out0 and out1 must be tensors of the same shape [B, D]")
            return supcon_loss(features, temperature=self.temperature, normalize=True, backend=self.backend,
                               process_group=_group(self.gather_distributed))
        bank = self.memory_bank
        for name, x in (("out0", out0), ("out1", out1)):
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != bank.dim:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} must be a tensor of shape [B, {bank.dim}] (the bank's dim), got {shape}")
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        negatives = bank.contents()[0].to(device=out0.device, dtype=out0.dtype)
        loss = info_nce(out0, out1, temperature=self.temperature, queue=negatives, in_batch_negatives=False,
                        backend=self.backend)
        if out0.requires_grad:  # lightly updates the bank only when a backward pass will follow
            keys = out1.detach()
            group = _group(self.gather_distributed)
            if group is not None:
                from .. import distributed

                keys = distributed.gather_batch(group, keys).tensors[0]
            bank.enqueue(keys[: bank.size - bank._ptr])  # lightly cuts a batch at the end of the buffer
        return loss


class DCLLoss(nn.Module):
    """lightly's ``DCLLoss`` (decoupled contrastive loss); see ``fused_contrastive.compat.lightly``.

    Example:
        >>> import torch
        >>> from fused_contrastive.compat.lightly import DCLLoss
        >>> loss = DCLLoss(temperature=0.1)(torch.randn(8, 16), torch.randn(8, 16))
    """

    def __init__(self, temperature: float = 0.1, weight_fn=None, gather_distributed: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        if weight_fn is not None:
            raise ValueError("weight_fn must be None: a custom weight function is not supported; DCLWLoss gives "
                             "the negative von Mises-Fisher weight")
        _check_common(temperature, gather_distributed, backend)
        self.temperature, self.gather_distributed, self.backend = temperature, gather_distributed, backend
        self.weighted, self.sigma = False, 0.5

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, " \
               f"backend={self.backend!r}" + (f", sigma={self.sigma}" if self.weighted else "")

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if not (isinstance(out0, Tensor) and isinstance(out1, Tensor) and out0.dim() == 2
                and out0.shape == out1.shape):
            raise ValueError("out0 and out1 must be tensors of the same shape [B, D]")
        features = torch.stack([F.normalize(out0, dim=1), F.normalize(out1, dim=1)], dim=1)
        return dcl_loss(features, temperature=self.temperature, weighted=self.weighted, sigma=self.sigma,
                        backend=self.backend, process_group=_group(self.gather_distributed))


class DCLWLoss(DCLLoss):
    """lightly's ``DCLWLoss`` (DCL with the negative von Mises-Fisher weight); see
    ``fused_contrastive.compat.lightly``.

    Example:
        >>> import torch
        >>> from fused_contrastive.compat.lightly import DCLWLoss
        >>> loss = DCLWLoss(temperature=0.1, sigma=0.5)(torch.randn(8, 16), torch.randn(8, 16))
    """

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False, *,
                 backend: str = "auto"):
        super().__init__(temperature, None, gather_distributed, backend=backend)
        from ..family import _check_sigma

        self.weighted, self.sigma = True, _check_sigma(sigma)
