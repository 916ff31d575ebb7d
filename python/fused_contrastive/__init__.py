"""Fused, memory-efficient contrastive losses (SupCon, SimCLR/NT-Xent, ...).

Backends: ``reference`` (naive, exact: the oracle), ``chunked`` (tiled PyTorch,
any device), ``triton`` and ``cuda`` (fused kernels). ``backend="auto"`` picks the
best one that can run the input; ``explain_backends`` says why the others cannot.
"""
from .dispatch import BACKEND_CHOICES
from .family import (BCLLoss, ClipLoss, DCLLoss, DebiasedContrastiveLoss, EpsSupInfoNCELoss, InfoNCELoss, SpreadLoss,
                     SuNCEtLoss, SymmetricSpreadLoss, UniConLoss, bcl_loss, clip_loss, dcl_loss,
                     debiased_contrastive_loss, eps_supinfonce_loss, info_nce, spread_loss, suncet_loss,
                     symmetric_spread_loss, unicon_loss, paco_loss, tsc_loss, PaCoLoss, TSCLoss,
                     epsilon_supcon_loss, EpsilonSupConLoss)
from .fairkl import FairKLLoss, fairkl_loss, fairkl_regularizer
from .grad_cache import grad_cache_step
from .losses import SupConLoss, supcon_loss, supcon_spec
from .memory import MemoryBank, MemoryBankLoss
from .siglip import SigLipLoss, siglip_loss
from .soft_losses import CoMatchLoss, SCELoss, comatch_loss, sce_loss
from .renyicl import RenyiCLLoss, renyicl_loss
from .cacr import CACRLoss, cacr_loss
from . import compat  # noqa: E402  (drop-ins for open_clip, pytorch-metric-learning, lightly)

__version__ = "0.1.0"


def explain_backends(features, labels=None, mask=None, **loss_kwargs) -> dict:
    """For a SupCon call with these arguments: each backend -> None if it can run, else the reason."""
    from .dispatch import explain

    return explain(supcon_spec(features, labels, mask, **loss_kwargs))


__all__ = ["SupConLoss", "supcon_loss", "EpsSupInfoNCELoss", "eps_supinfonce_loss", "DCLLoss", "dcl_loss",
           "InfoNCELoss", "info_nce", "ClipLoss", "clip_loss", "DebiasedContrastiveLoss", "debiased_contrastive_loss",
           "BCLLoss", "bcl_loss", "SpreadLoss", "spread_loss", "SymmetricSpreadLoss", "symmetric_spread_loss",
           "UniConLoss", "unicon_loss", "SuNCEtLoss", "suncet_loss", "PaCoLoss", "paco_loss", "TSCLoss", "tsc_loss",
           "epsilon_supcon_loss", "fairkl_regularizer", "fairkl_loss", "EpsilonSupConLoss", "FairKLLoss", "MemoryBank",
           "MemoryBankLoss", "SigLipLoss",
           "siglip_loss", "SCELoss", "sce_loss", "CoMatchLoss", "comatch_loss", "RenyiCLLoss", "renyicl_loss", "CACRLoss",
           "cacr_loss", "explain_backends", "BACKEND_CHOICES", "compat", "grad_cache_step", "__version__"]
