"""open_clip drop-ins: ``ClipLoss`` with open_clip's constructor, ``forward`` and return values (and
``SigLipLoss``, which is fused_contrastive.SigLipLoss: it has open_clip's signatures already).

``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
use_horovod=False)``; ``forward(image_features, text_features, logit_scale, logit_bias=None,
output_dict=False)`` returns the loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True`` (what
open_clip's training loop calls: ``loss(**model_out, output_dict=True)``; the keyword names are open_clip's,
so a CLIP model's output dict fits, and an unknown key is a TypeError as it is there).

One process: the mean of the image->text and text->image cross-entropies of ``logit_scale * image @
text.T`` (+ ``logit_bias``, which a softmax ignores), exactly open_clip's value and gradients.

``world_size > 1``: the loss runs on ``torch.distributed``'s default group (``process_group=WORLD``): every
rank gets the loss of the global batch, and each rank's gradient is world_size x its share of the global
gradient, so that DDP's averaging gives exactly the single-process gradient of the global batch. How that
relates to open_clip's four modes (checked in tests/test_compat.py on 2 gloo ranks):

=============================  ==========================================================================
open_clip mode                 relation to this class
=============================  ==========================================================================
local_loss=False,              same loss; open_clip's gradients are 1/world_size of ours (its local rows
gather_with_grad=False         get the global loss's gradient once, and DDP then averages: the global
                               gradient / world_size)
local_loss=False,              same loss, same gradients
gather_with_grad=True
local_loss=True,               open_clip returns this rank's rows' loss (its mean over ranks is ours);
gather_with_grad=True          gradients equal ours when every rank has the same batch size (open_clip's
                               labels assume it)
local_loss=True,               open_clip drops the other ranks' rows' dependence on this rank's features
gather_with_grad=False         (their logits against these keys are computed without a gradient): not the
                               gradient of any loss; ours is the exact one
=============================  ==========================================================================

So this class computes what open_clip computes with ``gather_with_grad=True`` (and ``local_loss=False``)
for any setting of the two flags, which are accepted and recorded. ``cache_labels`` has nothing to cache
(no labels tensor is formed). ``rank`` and ``world_size`` must match the default group's;
``use_horovod=True`` is refused (horovod is not supported).
"""
from __future__ import annotations

from torch import Tensor, nn

from .. import dispatch
from ..family import clip_loss
from ..losses import _check_choice

# open_clip's sigmoid loss: fused_contrastive.SigLipLoss already has its constructor and call.
from ..siglip import SigLipLoss  # noqa: E402,F401

__all__ = ["ClipLoss", "SigLipLoss"]


def _default_group(world_size: int, rank: int):
    """torch.distributed's default group, checked against the constructor's world_size and rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size = {world_size} needs torch.distributed initialised (init_process_group) "
                         "before the loss is called")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size = {world_size} differs from the default process group's size "
                         f"({dist.get_world_size()})")
    if dist.get_rank() != rank:
        raise ValueError(f"rank = {rank} differs from this process's rank in the default group "
                         f"({dist.get_rank()})")
    return dist.group.WORLD


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``, computed by ``fused_contrastive.clip_loss`` (see the module docstring for
    the distributed modes). ``backend``: this package's backend choice (keyword only).

    Example:
        >>> import torch
        >>> from fused_contrastive.compat.open_clip import ClipLoss
        >>> image = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
        >>> text = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
        >>> out = ClipLoss()(image, text, torch.tensor(14.3), output_dict=True)
        >>> sorted(out)
        ['contrastive_loss']
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, backend="auto"):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: run the ranks with torch.distributed "
                             "(world_size > 1 uses its default process group)")
        for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad),
                            ("cache_labels", cache_labels)):
            _check_choice(name, value, (False, True))
        for name, value, low in (("rank", rank, 0), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")
        _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod, self.backend = rank, world_size, use_horovod, backend

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}"

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        group = _default_group(self.world_size, self.rank) if self.world_size > 1 else None
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias=logit_bias, backend=self.backend,
                         process_group=group)
        return {"contrastive_loss": loss} if output_dict else loss
