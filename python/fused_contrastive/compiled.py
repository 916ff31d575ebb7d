"""torch.compile support: every loss as the same opaque custom op, ``fused_contrastive::contrast``.

The backends launch kernels from Python and read a few values on the host (the temperature, class
counts): neither is traceable, and tracing them would not make them faster. So under ``torch.compile``
the public losses build their ``ContrastSpec`` with ordinary traced tensor ops (view stacking, label ids,
bias tables: autograd chains through them for free) and hand its tensors and a small config to one
``torch.library.custom_op``. Its real implementation rebuilds the spec and runs a backend's
``loss_and_grads`` (or, when nothing needs a gradient, its forward alone); its registered backward only
scales the returned gradients by the incoming one. The graph stays whole (``fullgraph=True`` works).

Checks that need values on the host (NaN labels, mask weights, the temperature's range, finiteness) run
inside the real implementations (``contrast`` and ``check``), so they raise the package's ValueError when
the compiled graph runs instead of breaking the graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .spec import ContrastSpec, DenominatorBias, weight_grad

# Set to 1 to check every floating input for NaN / Inf (one host sync per input): a ValueError naming it.
# Off by default: like torch's own losses, non-finite input then gives a non-finite loss.
CHECK_FINITE_ENV = "FUSED_CONTRASTIVE_CHECK_FINITE"
DEFAULT_NAMES = ("features", "features", "temperature")


def finite_check_on() -> bool:
    return os.environ.get(CHECK_FINITE_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


def compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------- deferred value checks

@torch.library.custom_op("fused_contrastive::check", mutates_args=())
def check(x: Tensor, bad: Tensor, message: str) -> Tensor:
    """``x`` unchanged (a copy: custom ops may not return their inputs), or a ValueError(message) when
    any element of ``bad`` is true. Lets traced code state a check on values that only the run knows."""
    if bool(bad.any()):
        raise ValueError(message)
    return x.clone()


@check.register_fake
def _(x, bad, message):
    return torch.empty_like(x)


def _check_backward(ctx, grad):
    return grad, None, None


check.register_autograd(_check_backward, setup_context=lambda ctx, inputs, output: None)


def require(x: Tensor, bad: Tensor, message: str) -> Tensor:
    """``x``, after refusing it with ValueError(message) where ``bad`` holds a true element: right away in
    eager mode, when the graph runs under torch.compile (no host sync in the graph)."""
    if compiling():
        return check(x, bad, message)
    if bool(bad.any()):
        raise ValueError(message)
    return x


def deferred_errors(fn):
    """Decorate a public loss: a ValueError raised while torch.compile traces it (a bad argument) becomes an
    op that raises that ValueError when the graph runs. Under fullgraph=True Dynamo would otherwise report
    it as an error of its own ("Observed exception"); eagerly nothing changes."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not compiling():
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            return check(torch.zeros(()), torch.ones((), dtype=torch.bool), str(err))

    return call


# ----------------------------------------------------------------------------- the loss as one op

def _autograd_enabled_here():
    """Custom ops run below autograd's dispatch keys, but the debiased row formula (and the reference
    backend) differentiate O(N) values with autograd: put its keys back for the duration."""
    if not hasattr(torch._C, "_ForceDispatchKeyGuard"):  # (private API) without it, such losses fail loudly
        return contextlib.nullcontext()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _check_scalars(names: list[str], tau: float, acc: torch.dtype, base_temperature: Optional[float],
                   variant: str, beta: float) -> None:
    """The range checks a tensor temperature (or logit scale) gets in eager mode, on its value read here."""
    largest = torch.finfo(acc).max
    name = names[2]
    # CLIP passes 1 / logit_scale: its errors name logit_scale and show that value.
    value = (1.0 / tau if tau != 0 else math.inf) if name == "logit_scale" else tau
    if not (math.isfinite(tau) and tau > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if not tau * largest >= 1.0:
        raise ValueError(f"{name} = {value:.4g} is out of range: the logits' scale exceeds the largest {acc} "
                         f"number ({largest:.4g}; the loss accumulates in {acc}), so the logits would overflow")
    if base_temperature is not None and not tau / base_temperature <= largest:
        raise ValueError(f"base_temperature is out of range: temperature / base_temperature exceeds the largest "
                         f"{acc} number ({largest:.4g}), so the loss would overflow")
    if variant == "debiased" and not (1.0 + beta) / tau <= largest:
        raise ValueError(f"beta is out of range: (1 + beta) / temperature exceeds the largest {acc} number "
                         f"({largest:.4g}), so the hard-negative terms would overflow")


_SCHEMA_DOC = """Arguments: the spec's tensors (``anchors`` None: the anchors are ``keys`` itself, its gradient then
    sums both roles; ``row_weight``: the per-anchor weights or None), its settings, the backend,
    ``need_grads`` (False: no gradient work at all), ``temperature_grad`` (whether the temperature's
    gradient is wanted) and ``names`` ("anchors,keys,temperature" as the user calls them, for errors)."""


def _spec(keys, anchors, temperature, anchor_labels, key_labels, mask, bias_anchor_groups, bias_key_groups, bias_same,
          bias_other, pos_row_weight, row_weight, num_classes, self_offset, variant, base_temperature, no_positive,
          normalize, reduction, epsilon, tau_plus, beta, backend, need_grads, temperature_grad, names):
    """The spec the op's arguments describe (with the run-time checks), and the chosen backend."""
    names = names.split(",")
    if finite_check_on():
        for name, value in ((names[0], anchors), (names[1], keys), (names[2], temperature)):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be finite: it holds NaN or Inf ({CHECK_FINITE_ENV} is set)")
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    tau = float(temperature)  # read here, when the graph runs: a host read inside the graph would break it
    _check_scalars(names, tau, acc, base_temperature, variant, beta)
    learnable = need_grads and temperature_grad
    den_bias = None
    if bias_same is not None:
        den_bias = DenominatorBias(bias_anchor_groups, bias_key_groups, bias_same, bias_other)
    spec = ContrastSpec(
        anchors=keys if anchors is None else anchors, keys=keys, self_offset=self_offset,
        anchor_labels=anchor_labels, key_labels=key_labels, num_classes=num_classes, mask=mask,
        temperature=temperature.detach().reshape(()) if learnable else tau, base_temperature=base_temperature,
        no_positive=no_positive, normalize=normalize, tau_float=tau, reduction=reduction, variant=variant,
        den_bias=den_bias, pos_row_weight=pos_row_weight, epsilon=epsilon, tau_plus=tau_plus, beta=beta,
        row_weight=row_weight)
    return spec, dispatch.select(spec, backend)


def _loss_and_grads(spec: ContrastSpec, chosen) -> tuple:
    """(result, dQ, dK, dtau or None, dweight or None) of a "mean" / "sum" spec, without autograd outside."""
    with _autograd_enabled_here(), torch.autocast(spec.device.type, enabled=False):
        if chosen.loss_and_grads is None:  # the reference backend differentiates by autograd
            return _autograd_loss_and_grads(spec, chosen)
        loss, dQ, dK, dtau, rows = chosen.loss_and_grads(spec)
    dW = None
    if spec.row_weight is not None:
        dW = weight_grad(spec, rows.to(loss.dtype), spec.pos_count() > 0, loss)
    return loss, dQ, dK, dtau, dW


def _input_grads(keys, anchors, temperature, row_weight, dQ, dK, dtau, dW):
    """The op's gradient outputs: keys (both roles when ``anchors`` is None), anchors, temperature, weights."""
    empty = keys.new_empty(0)
    if anchors is None:
        grad_keys, grad_anchors = dK + dQ, empty
    else:
        grad_keys, grad_anchors = dK, dQ.contiguous()
    grad_tau = torch.zeros_like(temperature) if dtau is None else dtau.reshape(temperature.shape).to(temperature.dtype)
    grad_w = empty.clone() if dW is None or row_weight is None else dW.to(row_weight.dtype).contiguous()
    return grad_keys.contiguous(), grad_anchors, grad_tau, grad_w


@torch.library.custom_op("fused_contrastive::contrast", mutates_args=())
def contrast(keys: Tensor, anchors: Optional[Tensor], temperature: Tensor, anchor_labels: Optional[Tensor],
             key_labels: Optional[Tensor], mask: Optional[Tensor], bias_anchor_groups: Optional[Tensor],
             bias_key_groups: Optional[Tensor], bias_same: Optional[Tensor], bias_other: Optional[Tensor],
             pos_row_weight: Optional[Tensor], row_weight: Optional[Tensor], num_classes: int,
             self_offset: Optional[int], variant: str, base_temperature: Optional[float], no_positive: str,
             normalize: bool, reduction: str, epsilon: float, tau_plus: float, beta: float, backend: str,
             need_grads: bool, temperature_grad: bool, names: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(result, dResult/dkeys, dResult/danchors, dResult/dtemperature, dResult/drow_weight) of the spec.
    "mean" / "sum": the gradients are computed here (the per-row coefficients are known) and the backward
    only scales them. "none": the result is the rows and no gradient is computed here (their per-row
    gradient comes in the backward, ``contrast_backward``). Gradients are empty tensors when not computed
    (and the anchors' when ``anchors`` is None); the temperature's is zero unless ``temperature_grad``.
    """
    args = (keys, anchors, temperature, anchor_labels, key_labels, mask, bias_anchor_groups, bias_key_groups,
            bias_same, bias_other, pos_row_weight, row_weight, num_classes, self_offset, variant, base_temperature,
            no_positive, normalize, reduction, epsilon, tau_plus, beta, backend, need_grads, temperature_grad, names)
    spec, chosen = _spec(*args)
    empty = keys.new_empty(0)
    if not need_grads or reduction == "none":  # the backends' forward-only path: no gradient work at all
        with _autograd_enabled_here(), torch.autocast(spec.device.type, enabled=False), torch.no_grad():
            result = chosen.loss(spec).detach().clone()
        return result, empty, empty.clone(), empty.clone(), empty.clone()
    loss, dQ, dK, dtau, dW = _loss_and_grads(spec, chosen)
    return (loss.detach().clone(), *_input_grads(keys, anchors, temperature, row_weight, dQ, dK, dtau, dW))


@torch.library.custom_op("fused_contrastive::contrast_backward", mutates_args=())
def contrast_backward(grad_rows: Tensor, keys: Tensor, anchors: Optional[Tensor], temperature: Tensor,
                      anchor_labels: Optional[Tensor], key_labels: Optional[Tensor], mask: Optional[Tensor],
                      bias_anchor_groups: Optional[Tensor], bias_key_groups: Optional[Tensor],
                      bias_same: Optional[Tensor], bias_other: Optional[Tensor], pos_row_weight: Optional[Tensor],
                      row_weight: Optional[Tensor], num_classes: int, self_offset: Optional[int], variant: str,
                      base_temperature: Optional[float], no_positive: str, normalize: bool, reduction: str,
                      epsilon: float, tau_plus: float, beta: float, backend: str, need_grads: bool,
                      temperature_grad: bool, names: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward of ``contrast`` with reduction="none": the gradients (keys, anchors, temperature, weights)
    for the incoming per-row gradient G_i, i.e. those of sum_i G_i w_i L_i (the backend runs with these
    per-row coefficients; the rows' statistics are recomputed, not saved)."""
    spec, chosen = _spec(keys, anchors, temperature, anchor_labels, key_labels, mask, bias_anchor_groups,
                         bias_key_groups, bias_same, bias_other, pos_row_weight, None, num_classes, self_offset,
                         variant, base_temperature, no_positive, normalize, "sum", epsilon, tau_plus, beta, backend,
                         True, temperature_grad, names)
    acc = spec.accum_dtype
    coef = grad_rows.to(acc) if row_weight is None else grad_rows.to(acc) * row_weight.to(acc)
    spec = dataclasses.replace(spec, row_weight=coef)
    _, dQ, dK, dtau, dcoef = _loss_and_grads(spec, chosen)
    dW = None if row_weight is None else dcoef * grad_rows.to(acc)  # dcoef_i = L_i for a sum
    return _input_grads(keys, anchors, temperature, row_weight, dQ, dK, dtau, dW)


def _autograd_loss_and_grads(spec: ContrastSpec, chosen) -> tuple:
    keys = spec.keys.detach().requires_grad_()
    anchors = keys if spec.anchors_are_keys else spec.anchors.detach().requires_grad_()
    tau = spec.temperature.detach().requires_grad_() if isinstance(spec.temperature, Tensor) else None
    weight = None if spec.row_weight is None else spec.row_weight.detach().requires_grad_()
    leaf_spec = dataclasses.replace(spec, anchors=anchors, keys=keys, row_weight=weight,
                                    temperature=spec.temperature if tau is None else tau)
    leaves = ((keys,) if spec.anchors_are_keys else (anchors, keys)) + tuple(
        x for x in (tau, weight) if x is not None)
    with torch.enable_grad():
        loss = chosen.loss(leaf_spec)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    if spec.anchors_are_keys:
        dK, dQ, rest = grads[0], torch.zeros_like(keys), grads[1:]
    else:
        dQ, dK, rest = grads[0], grads[1], grads[2:]
    dtau = rest[0] if tau is not None else None
    dW = rest[-1] if weight is not None else None
    return loss, dQ, dK, dtau, dW


def _fake_grads(keys, anchors, temperature, row_weight, computed: bool):
    empty = keys.new_empty(0)
    if not computed:
        return empty, empty.clone(), empty.clone(), empty.clone()
    grad_anchors = empty if anchors is None else anchors.new_empty(anchors.shape)
    grad_w = empty.clone() if row_weight is None else row_weight.new_empty(row_weight.shape)
    return keys.new_empty(keys.shape), grad_anchors, temperature.new_empty(temperature.shape), grad_w


@contrast.register_fake
def _(keys, anchors, temperature, anchor_labels, key_labels, mask, bias_anchor_groups, bias_key_groups, bias_same,
      bias_other, pos_row_weight, row_weight, num_classes, self_offset, variant, base_temperature, no_positive,
      normalize, reduction, epsilon, tau_plus, beta, backend, need_grads, temperature_grad, names):
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    num_anchors = (keys if anchors is None else anchors).shape[0]
    result = keys.new_empty((num_anchors,) if reduction == "none" else (), dtype=acc)
    return (result, *_fake_grads(keys, anchors, temperature, row_weight, need_grads and reduction != "none"))


@contrast_backward.register_fake
def _(grad_rows, keys, anchors, temperature, *rest):
    return _fake_grads(keys, anchors, temperature, rest[8], True)


_TENSOR_ARGS = 12  # contrast's leading tensor arguments (keys ... row_weight); the rest are settings


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[18]
    ctx.settings = inputs[_TENSOR_ARGS:]
    ctx.has_anchors, ctx.has_weight = inputs[1] is not None, inputs[11] is not None
    if ctx.reduction == "none":  # the backward runs the backend with the incoming per-row gradient
        ctx.save_for_backward(*inputs[:_TENSOR_ARGS])
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_result, *_):
    if ctx.reduction == "none":
        if not ctx.settings[11]:  # need_grads
            raise RuntimeError("fused_contrastive::contrast ran without gradients (need_grads=False) but is "
                               "differentiated; call it with need_grads=True")
        tensors = ctx.saved_tensors
        g_keys, g_anchors, g_tau, g_w = contrast_backward(grad_result.contiguous(), *tensors, *ctx.settings)
        return (g_keys, g_anchors if ctx.has_anchors else None, g_tau, *(None,) * 8,
                g_w if ctx.has_weight else None) + (None,) * 14
    grad_keys, grad_anchors, grad_tau, grad_w = ctx.saved_tensors
    if grad_keys.numel() == 0 and grad_tau.numel() == 0:  # the forward was told no gradient was needed
        raise RuntimeError("fused_contrastive::contrast ran without gradients (need_grads=False) but is "
                           "differentiated; call it with need_grads=True")
    g_keys = grad_keys * grad_result.to(grad_keys.dtype)
    g_anchors = grad_anchors * grad_result.to(grad_anchors.dtype) if ctx.has_anchors else None
    g_tau = (grad_tau * grad_result).to(grad_tau.dtype)
    g_w = (grad_w * grad_result).to(grad_w.dtype) if ctx.has_weight else None
    return (g_keys, g_anchors, g_tau) + (None,) * 8 + (g_w,) + (None,) * 14


contrast.register_autograd(_backward, setup_context=_setup_context)


def op_arguments(spec: ContrastSpec, backend: str, names=DEFAULT_NAMES) -> tuple:
    """The op's arguments for a spec (ordinary traced PyTorch: a float temperature becomes a constant tensor)."""
    if isinstance(spec.temperature, Tensor):
        tau = spec.temperature.reshape(())
    else:
        tau = torch.tensor(spec.tau_float, dtype=torch.float64, device=spec.device)
    anchors = None if spec.anchors_are_keys else spec.anchors
    need_grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (spec.keys, anchors, tau, spec.row_weight))
    bias = spec.den_bias
    return (spec.keys, anchors, tau, spec.anchor_labels, spec.key_labels, spec.mask,
            None if bias is None else bias.anchor_groups, None if bias is None else bias.key_groups,
            None if bias is None else bias.same, None if bias is None else bias.other, spec.pos_row_weight,
            spec.row_weight, spec.num_classes, spec.self_offset, spec.variant, spec.base_temperature,
            spec.no_positive, spec.normalize, spec.reduction, spec.epsilon, spec.tau_plus, spec.beta, backend,
            need_grads, tau.requires_grad, ",".join(names))


def run(spec: ContrastSpec, backend: str = "auto", names=DEFAULT_NAMES) -> Tensor:
    """The loss of ``spec``: eagerly through the backend's autograd path, under torch.compile as the op.
    ``names``: the user's names of the anchors, the keys and the temperature, for run-time errors."""
    if not compiling():
        return dispatch.run(spec, backend)
    return contrast(*op_arguments(spec, backend, names))[0]
