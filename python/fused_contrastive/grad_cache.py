"""Gradient caching: one exact training step on a batch far larger than the encoder can hold activations for.

A contrastive loss couples every sample with every other one, so the batch cannot simply be split into
independent steps (gradient accumulation over micro-batches computes a different loss). The loss itself is
cheap to hold here (the fused losses keep O(N) statistics), the encoder's activations are not. So
:func:`grad_cache_step` works in three phases:

1. run every encoder over its input in micro-batches under ``torch.no_grad()`` (no activations kept) and
   concatenate the embeddings: ``[N, D]`` per tower, the only thing that grows with the whole batch;
2. compute the loss on those embeddings (leaf tensors) and backpropagate it: this gives the loss's gradient
   with respect to every embedding row (and fills the gradients of the loss's own parameters, e.g. a
   learnable CLIP ``logit_scale`` or temperature);
3. run each micro-batch again, this time with grad, and backpropagate its slice of the cached embedding
   gradient into the encoder: the parameter gradients accumulate to exactly those of one full-batch step,
   because the loss's gradient is linear in the embedding gradient and each row depends on its own
   micro-batch only.

Phase 3 must reproduce phase 1's embeddings exactly, so the random state (CPU and CUDA generators) is saved
before each micro-batch of phase 1 and restored before its re-run: dropout draws the same masks. After the
step the generators are left as phase 1 left them, so randomness is consumed once per step.

Mixed precision: call it inside ``torch.autocast(...)``; both passes then run under it (the fused losses
accumulate in fp32 whatever the embeddings' dtype). With an fp16 ``torch.cuda.amp.GradScaler`` pass it as
``scaler``: the loss is scaled before its backward, so the cached embedding gradients (and hence the
encoders' gradients) carry the scale that ``scaler.step`` removes.

DistributedDataParallel: pass the DDP-wrapped encoders and give the loss a ``process_group`` (gather or ring
mode): each rank's embedding gradient is then ``world_size x`` its share of the global gradient, which DDP's
averaging turns into the global gradient. Every re-run except an encoder's last happens under its
``no_sync()``, so DDP communicates once per encoder and step. DDP does not average the gradients of
parameters that live outside the wrapped encoders (a ``logit_scale`` passed to the loss): average those
yourself (``all_reduce`` then divide by the world size), as the distributed losses document.

Caveats: a module whose forward pass differs between calls other than through the random generators
(BatchNorm in training mode updates its running statistics on both passes, and normalises per micro-batch)
does not give a full-batch step; DDP's ``broadcast_buffers`` is a collective in every forward, so with
buffers and a different number of micro-batches per rank construct DDP with ``broadcast_buffers=False``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext

import torch
from torch import nn

__all__ = ["grad_cache_step"]


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _split(tower: int, x, size: int) -> list:
    """One tower's input in micro-batches of ``size`` rows: a tensor, or a mapping of keyword arguments whose
    tensors are split along dim 0 (other values go to every micro-batch as they are)."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"inputs[{tower}] must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        return list(torch.split(x, size))
    if isinstance(x, Mapping):
        rows = {k: v.shape[0] for k, v in x.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if not rows or len(set(rows.values())) != 1 or 0 in rows.values():
            raise ValueError(f"inputs[{tower}] (a mapping) must hold tensors with one common, non-empty batch "
                             f"size in dim 0, got {rows}")
        parts = {k: torch.split(v, size) if k in rows else None for k, v in x.items()}
        count = len(next(p for p in parts.values() if p is not None))
        return [{k: (parts[k][i] if parts[k] is not None else v) for k, v in x.items()} for i in range(count)]
    raise ValueError(f"inputs[{tower}] must be a tensor or a mapping of keyword arguments, got {type(x).__name__}")


def _call(encoder, chunk):
    out = encoder(**chunk) if isinstance(chunk, Mapping) else encoder(chunk)
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        raise ValueError(f"each encoder must return a tensor of embeddings with a batch dimension, got "
                         f"{type(out).__name__ if not isinstance(out, torch.Tensor) else 'a 0-d tensor'}")
    return out


def grad_cache_step(encoders: nn.Module | Sequence[nn.Module], inputs, loss_fn: Callable[..., torch.Tensor],
                    micro_batch_size: int, *, scaler=None) -> torch.Tensor:
    """Backpropagate ``loss_fn`` over a whole batch while keeping the activations of one micro-batch only.

    Args:
        encoders: one module (applied to every input, e.g. a shared tower or both views of SupCon) or one
            module per input (e.g. CLIP's image and text towers). DDP-wrapped modules are supported.
        inputs: a tensor, or a mapping of keyword arguments (e.g. ``{"input_ids": ..., "attention_mask":
            ...}``), or a list/tuple of those, one per tower. Tensors are split along dim 0.
        loss_fn: called once as ``loss_fn(*embeddings)`` with one ``[N_t, ...]`` tensor per tower (the
            micro-batches' outputs concatenated in order); returns a scalar loss, e.g.
            ``lambda img, txt: fc.clip_loss(img, txt, logit_scale.exp())``. Labels and other per-sample
            arguments of the whole batch are captured by the callable.
        micro_batch_size: rows per encoder call in both passes.
        scaler: an optional ``GradScaler`` (fp16 autocast): the loss is scaled before its backward.

    Returns the loss (detached). The encoders' parameter gradients (and those of anything ``loss_fn`` uses
    that requires grad) are accumulated into ``.grad`` as ``loss.backward()`` on the full batch would.
    """
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
    towers = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not towers:
        raise ValueError("inputs must hold at least one tower's input")
    if isinstance(encoders, nn.Module):
        modules = [encoders] * len(towers)
    else:
        modules = list(encoders)
        if len(modules) != len(towers) or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError(f"encoders must be one nn.Module or one per input ({len(towers)}), got "
                             f"{len(modules)} item(s)")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable: embeddings of every tower -> scalar loss")
    chunks = [_split(t, x, micro_batch_size) for t, x in enumerate(towers)]

    # Phase 1: embeddings without activations, with the random state before each micro-batch.
    states, embeddings = [], []
    with torch.no_grad():
        for module, parts in zip(modules, chunks):
            outs = []
            for part in parts:
                states.append(_rng_state())
                outs.append(_call(module, part))
            embeddings.append(torch.cat(outs).requires_grad_())
    after = _rng_state()

    # Phase 2: the loss and its gradient with respect to every embedding row.
    loss = loss_fn(*embeddings)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("loss_fn must return a scalar tensor that depends on the embeddings")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grads = [e.grad if e.grad is not None else torch.zeros_like(e) for e in embeddings]
    del embeddings

    # Phase 3: each micro-batch again, with grad, fed its slice of the cached gradient. A DDP module syncs
    # on its last call only (one module may serve several towers).
    calls = [(t, i) for t, parts in enumerate(chunks) for i in range(len(parts))]
    last = {id(modules[t]): k for k, (t, _) in enumerate(calls)}
    step = 0
    try:
        for t, (module, parts) in enumerate(zip(modules, chunks)):
            offset = 0
            for part in parts:
                _set_rng_state(states[step])
                sync = last[id(module)] == step or not hasattr(module, "no_sync")
                with nullcontext() if sync else module.no_sync():
                    out = _call(module, part)
                    rows = out.shape[0]
                    out.backward(grads[t][offset:offset + rows])
                offset += rows
                step += 1
    finally:
        _set_rng_state(after)
    return loss.detach()
