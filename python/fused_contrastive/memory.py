"""A memory bank: a FIFO of past keys (and their labels) that joins the denominators of any loss.

``MemoryBank`` is the storage: ``size`` rows of keys and labels in registered buffers, with the write
pointer and the fill level, so that ``state_dict`` / ``load_state_dict`` checkpoint and restore it
exactly. ``MemoryBankLoss`` wraps a loss of this package: each call computes the loss with the keys
of the previous steps as extra keys (or as ``info_nce``'s queue), then enqueues this step's keys.

Semantics, and how they relate to the two usual implementations:

* What is stored: every view of every sample (``[bsz, n_views, D]`` features, view-major, each view with
  its sample's label); for ``info_nce``, the ``key`` rows (a MoCo queue). Stored keys are detached
  copies: no gradient ever reaches them, nor through them the step that produced them.
* When: the bank holds only *past* batches. The current batch takes part in the loss as usual (with its
  gradients); its keys are enqueued after the loss is computed, and only in training mode (a loss
  evaluated in ``eval()`` mode leaves the bank as it was). pytorch-metric-learning's
  ``CrossBatchMemory`` enqueues first and then compares the batch with its whole memory, the batch's
  own (detached) copies included: the same loss value as ``MemoryBankLoss`` with ``size`` equal to
  its ``memory_size`` minus the batch size.
* Which entries: only the filled ones (an empty bank at the first step is the plain loss), as
  ``CrossBatchMemory`` does; lightly's ``memory_bank_size`` starts from random unit vectors instead, and
  drops the part of a batch that does not fit before the end of the buffer, where this FIFO wraps around.
  A batch larger than the bank leaves its last ``size`` keys.
* Which keys are negatives: every stored key is in every anchor's denominator; with labels, stored keys
  sharing an anchor's label are its positives (SupCon and its relatives), as in ``CrossBatchMemory``.
  lightly's ``NTXentLoss(memory_bank_size=...)`` contrasts each query with its positive and the bank only:
  ``MemoryBankLoss(info_nce, ..., in_batch_negatives=False)``.
* Distributed (``process_group`` of the loss): every rank enqueues the gathered global batch (ranks in
  order), so the banks stay identical on every rank, as the losses require of shared tensors.

Memory: the bank enters the loss as extra keys, so a backend holds O(N + size) per-row statistics, never
an N x size matrix (except ``backend="reference"``, the dense oracle).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import family, losses

# The losses a bank can join, and how: "views" losses take [bsz, n_views, D] features whose views are
# enqueued, with their labels when the loss takes them; info_nce enqueues its key rows as a MoCo queue.
_VIEWS_LOSSES = (losses.supcon_loss, family.eps_supinfonce_loss, family.bcl_loss, family.spread_loss,
                 family.symmetric_spread_loss, family.dcl_loss, family.debiased_contrastive_loss)
_REFUSED = {
    family.clip_loss: "clip_loss is symmetric: every image is an anchor of the image->text direction and every "
                      "text of the text->image one, while stored keys are never anchors, so a bank would enter one "
                      "direction only and break the symmetry; use MemoryBankLoss(info_nce, ...) for the one-way "
                      "loss with a queue",
}


class MemoryBank(nn.Module):
    """A FIFO of ``size`` keys of dimension ``dim`` (``dtype``) with one label each (``label_dtype``).

    ``enqueue(keys, labels=None, process_group=None)`` appends detached copies (the oldest rows are
    overwritten once full); ``contents()`` gives the filled rows as (keys, labels or None). Buffers:
    ``keys``, ``labels``, ``ptr`` (next row written), ``filled`` (rows in use), ``labelled``; they follow
    ``.to(device)`` and are saved by ``state_dict``.
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 label_dtype: torch.dtype = torch.int64):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if label_dtype not in losses.LABEL_DTYPES:
            raise ValueError(f"label_dtype must be one of {losses.LABEL_DTYPES}, got {label_dtype!r}")
        self.size, self.dim = size, dim
        self.register_buffer("keys", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("labels", torch.zeros(size, dtype=label_dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("labelled", torch.zeros((), dtype=torch.bool))
        self._sync_counters()

    def _sync_counters(self) -> None:
        # Host copies of the counters, so that using the bank needs no device-to-host read each step.
        self._ptr, self._filled, self._labelled = int(self.ptr), int(self.filled), bool(self.labelled)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_counters()

    def reset(self) -> None:
        """Empty the bank (the stored rows are forgotten, not zeroed)."""
        self.ptr.zero_()
        self.filled.zero_()
        self.labelled.zero_()
        self._sync_counters()

    def __len__(self) -> int:
        return self._filled

    def contents(self, ordered: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """(keys [n, dim], labels [n] or None) of the n filled rows, detached. ``ordered``: oldest first
        (a copy once the bank has wrapped around); otherwise in storage order, which a loss does not see."""
        n = self._filled
        keys, labels = self.keys[:n], self.labels[:n]
        if ordered and n == self.size and self._ptr:
            keys, labels = torch.roll(keys, -self._ptr, 0), torch.roll(labels, -self._ptr, 0)
        return keys, labels if self._labelled else None

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Optional[Tensor] = None, process_group=None) -> None:
        """Append ``keys [B, dim]`` (and ``labels [B]``: all enqueues with labels or all without). With
        ``process_group``: every rank passes its own rows and enqueues the gathered rows of all ranks, in
        rank order (the same call on every rank)."""
        if not isinstance(keys, Tensor) or keys.dim() != 2 or keys.shape[1] != self.dim:
            shape = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
            raise ValueError(f"keys must be a tensor of shape [B, {self.dim}], got {shape}")
        if not keys.is_floating_point():
            raise ValueError(f"keys must be a floating tensor, got {keys.dtype}")
        if labels is not None:
            labels = losses._as_labels("labels", labels).reshape(-1).to(keys.device)
            if labels.numel() != keys.shape[0]:
                raise ValueError(f"labels must have one entry per key: expected {keys.shape[0]}, got {labels.numel()}")
            losses._check_nan_labels("labels", labels)
            # A cast that changes a label (0.5 -> 0, 300 -> 44 in uint8) would silently merge classes; torch.eq
            # compares in the promoted dtype. (Checked only across dtypes: it reads the device.)
            if labels.dtype != self.labels.dtype and not bool(torch.eq(labels.to(self.labels.dtype), labels).all()):
                raise ValueError(f"labels must be representable in the bank's label_dtype {self.labels.dtype} "
                                 f"(got {labels.dtype} values that change in it); build the bank with a wider "
                                 "label_dtype")
        if self._filled and (labels is not None) != self._labelled:
            raise ValueError("labels must be given at every enqueue or at none: the bank holds "
                             f"{'labelled' if self._labelled else 'unlabelled'} keys (reset() it to change)")
        keys = keys.detach()
        if process_group is not None:
            from . import distributed

            batch = distributed.gather_batch(process_group, keys, None if labels is None else labels.detach())
            keys, labels = batch.tensors
        rows = keys.shape[0]
        if rows == 0:
            return
        # A FIFO keeps the newest rows: a batch larger than the bank leaves its last `size` rows.
        skip = max(0, rows - self.size)
        start = (self._ptr + skip) % self.size
        index = (start + torch.arange(rows - skip, device=self.keys.device)) % self.size
        # Out of place: the previous tensors may still be saved by the autograd graph of this step's loss,
        # which read them; writing into them would change what its backward sees.
        self.keys = self.keys.index_copy(0, index, keys[skip:].to(device=self.keys.device, dtype=self.keys.dtype))
        if labels is not None:
            self.labels = self.labels.index_copy(0, index, labels[skip:].to(device=self.labels.device,
                                                                             dtype=self.labels.dtype))
        self._ptr, self._filled = (self._ptr + rows) % self.size, min(self.size, self._filled + rows)
        self._labelled = labels is not None
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)
        self.labelled.fill_(self._labelled)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.keys.dtype}, filled={self._filled}"


def _identify(loss):
    """(the functional loss, the module or None, its stored keyword arguments) for a loss of this package."""
    if isinstance(loss, losses.SupConLoss):
        return losses.supcon_loss, loss, {"process_group": loss.process_group}
    if isinstance(loss, family._LossModule):
        return type(loss).fn, loss, dict(loss.kwargs)
    return loss, None, {}


class MemoryBankLoss(nn.Module):
    """A loss of this package with a memory bank of the keys of past steps (pytorch-metric-learning's
    ``CrossBatchMemory``, lightly's ``memory_bank_size``, MoCo's queue).

    ``loss``: ``supcon_loss``, ``eps_supinfonce_loss``, ``dcl_loss``, ``debiased_contrastive_loss``,
    ``bcl_loss``, ``spread_loss``, ``symmetric_spread_loss`` or ``info_nce`` (the function, or its module form such as
    ``SupConLoss(...)``); ``clip_loss`` is refused (see below). ``size``, ``dim``, ``dtype``,
    ``label_dtype``: the bank's (``MemoryBank``). ``loss_kwargs``: passed to the loss at every call
    (temperature, backend, process_group, ...); ``forward``'s keyword arguments override them.

    ``forward(*tensors, **kwargs)`` takes the loss's own tensors (``features, labels`` or
    ``query, key``), computes the loss with the bank's current rows as ``extra_keys`` (labelled when the
    loss has labels) or as ``info_nce``'s ``queue``, then, in training mode, enqueues this step's keys
    (see ``fused_contrastive.memory`` for the exact semantics). With a ``process_group`` every rank
    enqueues the global batch, so the banks stay identical.

    ``clip_loss`` takes no bank: it is symmetric (images are the anchors of one direction, texts of the
    other), while stored keys are never anchors; use ``info_nce`` for the one-way loss with a queue.
    """

    def __init__(self, loss, size: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 label_dtype: torch.dtype = torch.int64, **loss_kwargs):
        super().__init__()
        fn, module, stored = _identify(loss)
        if fn in _REFUSED:
            raise ValueError(f"loss: {_REFUSED[fn]}")
        if fn not in _VIEWS_LOSSES and fn is not family.info_nce:
            raise ValueError(f"loss must be one of the package's losses that take keys (supcon_loss, "
                             f"eps_supinfonce_loss, dcl_loss, debiased_contrastive_loss, bcl_loss, spread_loss, "
                             f"symmetric_spread_loss, info_nce) or their modules, got {loss!r}")
        for name in ("extra_keys", "extra_key_labels", "queue"):
            if name in loss_kwargs or name in stored:
                raise ValueError(f"{name} must not be given: the memory bank supplies it")
        if fn is family.info_nce and (loss_kwargs.get("symmetric") or stored.get("symmetric")):
            raise ValueError("symmetric must be False with a memory bank: the queue's keys have no anchors, so "
                             "the key->query direction could not use it")
        self.fn, self.loss, self.stored, self.loss_kwargs = fn, module, stored, loss_kwargs
        self.bank = MemoryBank(size, dim, dtype=dtype, label_dtype=label_dtype)

    def forward(self, *tensors, **kwargs) -> Tensor:
        kwargs = {**self.loss_kwargs, **kwargs}
        for name in ("extra_keys", "extra_key_labels", "queue"):
            if name in kwargs:
                raise ValueError(f"{name} must not be given: the memory bank supplies it")
        group = kwargs.get("process_group", self.stored.get("process_group"))
        first = tensors[0] if tensors else kwargs.get("features", kwargs.get("query"))
        if not isinstance(first, Tensor):
            raise ValueError("the loss's first tensor (features or query) must be a tensor, got "
                             f"{type(first).__name__}")
        keys, key_labels = self.bank.contents()
        keys = keys.to(device=first.device, dtype=first.dtype) if len(self.bank) else None
        if self.fn is family.info_nce:  # a MoCo queue: this step's key rows join it
            loss = self._call(tensors, kwargs, {"queue": keys})
            if self.training:
                self.bank.enqueue(tensors[1] if len(tensors) > 1 else kwargs["key"], None, group)
            return loss
        labels = tensors[1] if len(tensors) > 1 else kwargs.get("labels")
        if len(tensors) > 2 or kwargs.get("mask") is not None:
            raise ValueError("mask cannot be combined with a memory bank: stored keys need labels (positives by "
                             "label) or none")
        if len(self.bank) and (labels is not None) != self.bank._labelled:
            raise ValueError("labels must be given at every call or at none: the bank holds "
                             f"{'labelled' if self.bank._labelled else 'unlabelled'} keys")
        loss = self._call(tensors, kwargs, {"extra_keys": keys, "extra_key_labels": key_labels})
        if self.training:  # the views of every sample (of every rank), view-major as the losses stack them
            features = losses._flatten_views(first).detach()
            if labels is not None:
                labels = losses._check_labels(labels, features.shape[0], features.device)
            if group is not None:
                from . import distributed

                features, labels = distributed.gather_batch(group, features, labels).tensors
            self.bank.enqueue(features.transpose(0, 1).reshape(-1, features.shape[-1]),
                              None if labels is None else labels.repeat(features.shape[1]))
        return loss

    def _call(self, tensors, kwargs, extra) -> Tensor:
        extra = {k: v for k, v in extra.items() if v is not None}  # an empty bank: the plain loss
        if self.loss is not None and not kwargs:
            return self.loss(*tensors, **extra)
        if self.loss is not None:  # keyword arguments override the module's settings (its forward takes none)
            kwargs = {**self.loss.kwargs, **kwargs}
        return self.fn(*tensors, **kwargs, **extra)

    def extra_repr(self) -> str:
        return f"loss={getattr(self.fn, '__name__', self.fn)}, " + ", ".join(
            f"{k}={v!r}" for k, v in self.loss_kwargs.items())
