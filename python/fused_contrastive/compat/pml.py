"""pytorch-metric-learning drop-ins: ``SupConLoss``, ``NTXentLoss`` and ``CrossBatchMemory``.

Same constructors, defaults, ``forward`` signatures and results as pytorch-metric-learning (pml 2.x) in its
default configuration (cosine similarity on L2-normalised embeddings, the loss's default reducer), computed
by this package's backends: no ``[N, M]`` similarity matrix is formed.

What pml does, and how each part maps (``N`` anchors, keys ``K``: the batch itself, or ``ref_emb``):

* Embeddings (and ``ref_emb``) are L2-normalised (``normalize=True``); ``l_ij = cos(x_i, k_j) / temperature``.
* Pairs: with keys = the batch, a key of the anchor's label other than itself is a positive, every other
  label a negative. With ``ref_emb`` the keys are ``ref_emb`` alone (the batch is not among them) and nothing
  is "self", except when ``ref_labels`` is the very same tensor object as ``labels``: pml then drops the
  pairs ``(i, i)`` (it checks identity, not values), and so does this class.
* The whole loss is 0 (zero gradient) when the batch has no positive pair or no negative pair at all
  (a single class, all labels distinct), or at most one of each: pml's early exits.
* ``SupConLoss``: per anchor SupCon's ``L_i = -mean_{p in P_i} log softmax_{P_i u N_i}(l)_p``; pml's
  ``AvgNonZeroReducer`` averages the anchors with a loss above 0, i.e. the anchors with a positive
  (``no_positive="exclude"``). (An anchor with a positive has a loss of exactly 0 only when its positive
  is its only key; then every anchor with a positive has loss 0 and both means are 0.)
* ``NTXentLoss``: per positive pair ``(i, p)``: ``-log(e^{l_ip} / (e^{l_ip} + sum_{n in N_i} e^{l_in}))``,
  which is epsilon-SupInfoNCE with epsilon = 0; pml's ``MeanReducer`` averages over positive *pairs*, so
  the anchors' rows are weighted by their positive counts ``|P_i|``.
* pml adds ``finfo.tiny`` inside its logarithms and positive counts; these change nothing above rounding.

Not supported (a ValueError naming the argument): ``indices_tuple`` (miners' pair subsets), a non-default
``distance``, ``reducer`` or ``embedding_regularizer``, and ``CrossBatchMemory``'s ``miner``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from .. import compiled, dispatch
from ..family import _without_positives
from ..losses import _check_choice, _check_temperature, supcon_spec
from ..memory import MemoryBank

__all__ = ["SupConLoss", "NTXentLoss", "CrossBatchMemory"]


def _check_embeddings(name: str, x) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating tensor of shape [N, D] (pml's embeddings), got {shape}")
    return x


def _pair_counts(spec) -> tuple[Tensor, Tensor]:
    """(|P_i|, |N_i|) per anchor from the spec's labels (no [N, M] tensor): positives, and the other keys
    but self."""
    pos = spec.pos_count()
    return pos, spec.den_count() - pos


class _PairLoss(nn.Module):
    """What SupConLoss and NTXentLoss share: pml's constructor options and forward checks, the spec of
    anchors against keys (the batch or ref_emb), pml's early exits."""

    def __init__(self, temperature, *, distance=None, reducer=None, embedding_regularizer=None,
                 embedding_reg_weight=1, collect_stats=None, backend="auto"):
        super().__init__()
        for name, value in (("distance", distance), ("reducer", reducer),
                            ("embedding_regularizer", embedding_regularizer)):
            if value is not None:
                raise ValueError(f"{name} must be None: this drop-in is pml's default configuration (cosine "
                                 f"similarity, {type(self).__name__}'s default reducer, no regularizer)")
        _check_temperature("temperature", temperature)
        _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
        self.temperature, self.backend = temperature, backend

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        if indices_tuple is not None:
            raise ValueError("indices_tuple is not supported: the fused losses take every pair the labels define "
                             "(pml's behaviour without a miner); pass indices_tuple=None")
        if labels is None:
            raise ValueError("labels must be given (pml: labels and indices_tuple cannot both be None); for "
                             "SimCLR-style pairs without labels use fused_contrastive.supcon_loss")
        _check_embeddings("embeddings", embeddings)
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError("ref_labels was given without ref_emb")
            spec = supcon_spec(embeddings, labels, temperature=self.temperature, normalize=True,
                               no_positive="exclude")
        else:
            _check_embeddings("ref_emb", ref_emb)
            if ref_labels is None:
                raise ValueError("ref_emb needs ref_labels: one label per row of ref_emb")
            same = (ref_labels is labels and isinstance(labels, Tensor)
                    and labels.device == embeddings.device == ref_emb.device)
            spec = self._ref_spec(embeddings, labels, ref_emb, ref_labels, same)
        return self._loss(spec, embeddings)

    def _ref_spec(self, anchors: Tensor, labels, keys: Tensor, key_labels, self_excluded: bool):
        """Anchors against ``keys`` only (pml's ref_emb): SupCon's spec of the batch with the keys as extra
        keys (one validation, one class numbering), then the batch's own rows dropped from the keys."""
        spec = supcon_spec(anchors, labels, temperature=self.temperature, normalize=True, no_positive="exclude",
                           extra_keys=keys, extra_key_labels=key_labels)
        n = anchors.shape[0]
        return dataclasses.replace(spec, anchors=anchors, keys=keys, key_labels=spec.key_labels[n:],
                                   self_offset=0 if self_excluded else None)

    def _loss(self, spec, embeddings: Tensor) -> Tensor:
        pos, neg = _pair_counts(spec)
        total_pos, total_neg = int(pos.sum()), int(neg.sum())
        if total_pos == 0 or total_neg == 0 or (total_pos <= 1 and total_neg <= 1):
            return (embeddings * 0).sum()  # pml's zero loss: 0 with a zero gradient for the embeddings
        return self._reduce(spec, pos)

    def _reduce(self, spec, pos: Tensor) -> Tensor:
        raise NotImplementedError


class SupConLoss(_PairLoss):
    """pytorch-metric-learning's ``SupConLoss(temperature=0.1)``:
    ``forward(embeddings [N, D], labels [N], indices_tuple=None, ref_emb=None, ref_labels=None)``.

    The mean over the anchors with a positive of ``-mean_{p in P_i} log(e^{l_ip} / sum_{k in P_i u N_i}
    e^{l_ik})``, ``l = cos / temperature``; 0 when the batch has no positive or no negative pair. See
    ``fused_contrastive.compat.pml`` for the exact mapping. ``backend``: this package's backend choice.

    Example:
        >>> import torch
        >>> from fused_contrastive.compat.pml import SupConLoss
        >>> loss = SupConLoss(temperature=0.1)(torch.randn(8, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    """

    def __init__(self, temperature=0.1, **kwargs):
        super().__init__(temperature, **kwargs)

    def _reduce(self, spec, pos: Tensor) -> Tensor:
        return compiled.run(spec, self.backend)


class NTXentLoss(_PairLoss):
    """pytorch-metric-learning's ``NTXentLoss(temperature=0.07)``, same ``forward`` as ``SupConLoss``.

    The mean over positive pairs ``(i, p)`` of ``-log(e^{l_ip} / (e^{l_ip} + sum_{n in N_i} e^{l_in}))``,
    ``l = cos / temperature``; 0 when the batch has no positive or no negative pair. Computed as
    epsilon-SupInfoNCE with epsilon = 0 per anchor, the anchors' mean weighted by their positive counts.
    See ``fused_contrastive.compat.pml``.

    Example:
        >>> import torch
        >>> from fused_contrastive.compat.pml import NTXentLoss
        >>> loss = NTXentLoss()(torch.randn(8, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    """

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__(temperature, **kwargs)

    def _reduce(self, spec, pos: Tensor) -> Tensor:
        # pml's per-pair mean is sum_i |P_i| L_i / sum_i |P_i| with L_i the anchor's mean over its positives:
        # the anchors' mean weighted by their positive counts.
        spec = dataclasses.replace(spec, variant="eps", epsilon=0.0, row_weight=pos)
        return compiled.run(dataclasses.replace(spec, den_bias=_without_positives(spec)), self.backend)


class CrossBatchMemory(nn.Module):
    """pytorch-metric-learning's ``CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)``
    for ``loss`` = this module's ``SupConLoss`` or ``NTXentLoss``; ``forward(embeddings, labels,
    indices_tuple=None, enqueue_mask=None)``.

    pml's semantics: the batch is enqueued first (detached copies, FIFO, wrapping around), then the batch's
    anchors are compared with the memory's filled rows as ``ref_emb`` (keys that get no gradient), the
    anchor's own copy left out; with ``enqueue_mask`` the masked rows only go to the memory and the other
    rows are the anchors (nothing is left out). The memory is a ``fused_contrastive.MemoryBank``
    (``self.bank``; its keys take the embeddings' dtype and device, as pml's memory does). ``miner`` must be
    None and ``indices_tuple`` too.

    One difference: for a batch of a single row pml keeps the anchor's own copy in the memory as its
    positive (its filter of self-comparisons mistakes a one-row batch for one that wraps around the end
    of the memory); here the own copy is left out for every batch size.
    """

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None):
        super().__init__()
        if not isinstance(loss, _PairLoss):
            raise ValueError("loss must be fused_contrastive.compat.pml's SupConLoss or NTXentLoss, got "
                             f"{type(loss).__name__}")
        if miner is not None:
            raise ValueError("miner must be None: miners select pair subsets, which the fused losses do not take")
        self.loss, self.embedding_size, self.memory_size = loss, embedding_size, memory_size
        self.bank = MemoryBank(memory_size, embedding_size)

    def reset_queue(self) -> None:
        self.bank.reset()

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None, enqueue_mask=None) -> Tensor:
        if indices_tuple is not None:
            raise ValueError("indices_tuple is not supported (the fused losses take every pair); pass None")
        _check_embeddings("embeddings", embeddings)
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must be a tensor of shape [N] with N = {embeddings.shape[0]}")
        labels = labels.to(embeddings.device)
        bank = self.bank
        if bank.keys.dtype != embeddings.dtype or bank.keys.device != embeddings.device:
            bank.keys = bank.keys.to(device=embeddings.device, dtype=embeddings.dtype)
        if bank.labels.dtype != labels.dtype or bank.labels.device != labels.device:
            bank.labels = bank.labels.to(device=labels.device, dtype=labels.dtype)
        if enqueue_mask is not None:
            enqueue_mask = torch.as_tensor(enqueue_mask, device=embeddings.device)
            if enqueue_mask.dtype != torch.bool or enqueue_mask.shape != labels.shape:
                raise ValueError(f"enqueue_mask must be a bool tensor of shape [{labels.shape[0]}]")
            bank.enqueue(embeddings[enqueue_mask], labels[enqueue_mask])
            keys, key_labels = bank.contents()
            anchors, anchor_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            spec = self.loss._ref_spec(anchors, anchor_labels, keys, key_labels, False)
            return self.loss._loss(spec, anchors)
        n = embeddings.shape[0]
        if n > self.memory_size:
            raise ValueError(f"embeddings must have at most memory_size = {self.memory_size} rows, got {n}")
        start = bank._ptr
        bank.enqueue(embeddings, labels)
        keys, key_labels = bank.contents()
        # The memory but this batch's slots, after the batch's own detached copies: anchor i's copy is key i.
        others = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
        others[(start + torch.arange(n, device=keys.device)) % self.memory_size] = False
        keys = torch.cat([embeddings.detach(), keys[others]])
        key_labels = torch.cat([labels, key_labels[others]])
        spec = self.loss._ref_spec(embeddings, labels, keys, key_labels, True)
        return self.loss._loss(spec, embeddings)
