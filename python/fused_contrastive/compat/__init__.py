"""Drop-in classes for other libraries' contrastive losses, computed by this package's fused losses.

One module per library, each class with that library's constructor, ``forward`` signature, defaults and
return value (see each module's docstring for the exact mapping and the few differences):

* ``fused_contrastive.compat.open_clip``: ``ClipLoss``, ``SigLipLoss``
* ``fused_contrastive.compat.pml`` (pytorch-metric-learning): ``SupConLoss``, ``NTXentLoss``,
  ``CrossBatchMemory``
* ``fused_contrastive.compat.lightly``: ``NTXentLoss``, ``DCLLoss``, ``DCLWLoss``

Swap an import, e.g. ``from fused_contrastive.compat.pml import SupConLoss`` for
``from pytorch_metric_learning.losses import SupConLoss``. None of the three libraries is needed.
"""
from . import lightly, open_clip, pml

__all__ = ["lightly", "open_clip", "pml"]
