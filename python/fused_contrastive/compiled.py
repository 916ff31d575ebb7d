"""torch.compile support: the whole loss as one opaque custom op.

Building a spec validates data (label classes, mask values) and the backends launch
kernels from Python: neither is traceable, and tracing them would not make them faster.
Under ``torch.compile`` the loss is therefore one ``torch.library.custom_op``. Its real
implementation runs the eager path through a backend's ``loss_and_grads`` (autograd is
switched off inside custom ops), returning the loss with the gradients of the features
and of the temperature; its registered backward only scales them by the incoming
gradient. The graph stays whole (``fullgraph=True`` works).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


@torch.library.custom_op("fused_contrastive::supcon", mutates_args=())
def supcon_op(features: Tensor, labels: Optional[Tensor], mask: Optional[Tensor], temperature: Tensor,
              learnable_temperature: bool, base_temperature: Optional[float], contrast_mode: str, no_positive: str,
              normalize: bool, variant: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    from . import dispatch
    from .losses import supcon_spec

    # A temperature that needs no gradient travels as a number, as in eager mode.
    tau = temperature.detach().requires_grad_() if learnable_temperature else float(temperature)
    spec = supcon_spec(features, labels, mask, temperature=tau, base_temperature=base_temperature,
                       contrast_mode=contrast_mode, no_positive=no_positive, normalize=normalize, variant=variant)
    chosen = dispatch.select(spec, backend)
    if chosen.loss_and_grads is None:
        raise RuntimeError(f"backend {chosen.name!r} runs eagerly only; under torch.compile use chunked or triton")
    with torch.autocast(spec.device.type, enabled=False):
        loss, dQ, dK, dtau = chosen.loss_and_grads(spec)
    # Keys are the views stacked view-major; anchors are all of them or the first bsz rows.
    bsz, n_views = features.shape[0], (features.shape[1] if features.dim() > 2 else 1)
    grad_keys = dK.clone()
    grad_keys[: dQ.shape[0]] += dQ
    grad_features = grad_keys.reshape(n_views, bsz, -1).transpose(0, 1).reshape(features.shape)
    dtau = torch.zeros_like(temperature) if dtau is None else dtau.reshape(temperature.shape)
    return loss, grad_features.contiguous(), dtau


@supcon_op.register_fake
def _(features, labels, mask, temperature, learnable_temperature, base_temperature, contrast_mode, no_positive,
      normalize, variant, backend):
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    return features.new_empty((), dtype=acc), torch.empty_like(features), torch.empty_like(temperature)


def _setup_context(ctx, inputs, output):
    _, grad_f, grad_tau = output
    ctx.save_for_backward(grad_f, grad_tau)


def _backward(ctx, grad_loss, _grad_f, _grad_tau):
    grad_f, grad_tau = ctx.saved_tensors
    return (grad_f * grad_loss.to(grad_f.dtype), None, None, (grad_tau * grad_loss).to(grad_tau.dtype),
            None, None, None, None, None, None, None)


supcon_op.register_autograd(_backward, setup_context=_setup_context)


def supcon_loss_compiled(features, labels, mask, *, temperature, base_temperature, contrast_mode, no_positive,
                         normalize, variant, backend) -> Tensor:
    """The loss as traced by torch.compile; a float temperature becomes a constant tensor."""
    learnable = isinstance(temperature, Tensor) and temperature.requires_grad
    if isinstance(temperature, Tensor):
        tau = temperature.reshape(())
    else:
        tau = torch.tensor(float(temperature), dtype=torch.float64, device=features.device)
    loss, _, _ = supcon_op(features, labels, mask, tau, learnable, base_temperature, contrast_mode, no_positive,
                           normalize, variant, backend)
    return loss
