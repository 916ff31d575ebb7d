"""Public losses: validate the arguments, build a ContrastSpec, dispatch.

Every argument error is a ValueError that names the argument and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import compiled, dispatch
from .compiled import CHECK_FINITE_ENV, compiling, deferred_errors, finite_check_on, require
from .distributed import agreed, append_keys
from .spec import NO_POSITIVE_MODES, REDUCTIONS, VARIANTS, ContrastSpec

CONTRAST_MODES = ("all", "one")
# Label dtypes that torch.eq can compare with any other (torch has no promotion for uint16/32/64).
LABEL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_data(name: str, value: Tensor) -> None:
    """Meta tensors have a shape but no values: nothing could be computed (or validated) from them."""
    if value.device.type == "meta":
        raise ValueError(f"{name} must hold data (a tensor on cpu, cuda, ...), got a tensor on the meta device")


def _accum_dtype(features: Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _check_scale(name: str, scale: float, dtype: torch.dtype, what: str, overflows: str = "the logits") -> None:
    """``scale`` multiplies the logits (1 / temperature, CLIP's logit scale) or the loss: beyond the largest
    number of the accumulation dtype it is inf there, and so is what it multiplies."""
    largest = torch.finfo(dtype).max
    if not scale <= largest:
        raise ValueError(f"{name} is out of range: {what} = {scale:.4g} exceeds the largest {dtype} number "
                         f"({largest:.4g}; the loss accumulates in {dtype}), so {overflows} would overflow")


def _check_inverse(name: str, value: float, dtype: torch.dtype, overflows: str = "the logits") -> None:
    """``1 / value`` must be finite in ``dtype`` (checked without dividing: value may be subnormal)."""
    if not value * torch.finfo(dtype).max >= 1.0:
        raise ValueError(f"{name} = {value:.4g} is too small for {dtype} features: 1 / {name} exceeds the largest "
                         f"number of the {dtype} accumulation ({torch.finfo(dtype).max:.4g}), so {overflows} would "
                         f"overflow; use {name} >= {1.0 / torch.finfo(dtype).max:.4g}")


def tau_unknown(temperature: Tensor) -> float:
    """A tensor temperature's value: NaN while tracing (torch.compile), where reading it would break the graph."""
    return math.nan if compiling() else float(temperature.detach())


def _check_finite(**tensors) -> None:
    """With FUSED_CONTRASTIVE_CHECK_FINITE=1, a ValueError for NaN / Inf in any of these floating inputs."""
    if not finite_check_on() or compiling():  # under torch.compile the op checks its inputs when it runs
        return
    for name, value in tensors.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value.detach()).all()):
            raise ValueError(f"{name} must be finite: it holds NaN or Inf ({CHECK_FINITE_ENV} is set)")


def _check_temperature(name: str, value, allow_none: bool = False,
                       known_value: Optional[float] = None) -> Union[float, Tensor, None]:
    """The temperature as a float, or as a 0-dim tensor when it requires grad.
    ``known_value``: its value when ``value`` is a tensor that cannot be read (inside torch.func)."""
    if value is None and allow_none:
        return None
    if isinstance(value, Tensor):
        if known_value is None:
            _check_data(name, value)
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a positive number or a one-element floating tensor, "
                             f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        if known_value is None and compiling():
            return value.reshape(())  # its value is unknown while tracing: the op checks it when it runs
        number = float(value.detach()) if known_value is None else known_value
        result: Union[float, Tensor] = (value if value.dim() == 0 else value.reshape(())) if value.requires_grad else number
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = result = float(value)
    else:
        raise ValueError(f"{name} must be a positive number, got {type(value).__name__}")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {number}")
    return result


def _check_base_temperature(value) -> Optional[float]:
    """SupCon's loss scale denominator: None (the temperature) or a positive number, never learned."""
    value = _check_temperature("base_temperature", value, allow_none=True)
    if isinstance(value, Tensor):
        raise ValueError("base_temperature must be a number, not a tensor that requires grad")
    return value


def _flatten_views(features) -> Tensor:
    """[bsz, n_views, ...] -> [bsz, n_views, D]; a flat [N, D] is [N, 1, D]."""
    if not isinstance(features, Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    _check_data("features", features)
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating tensor (float16, bfloat16, float32 or float64), got {features.dtype}")
    if features.dim() < 2:
        raise ValueError("features must be [bsz, n_views, ...] or [N, D], "
                         f"got shape {tuple(features.shape)}")
    if features.dim() == 2:
        features = features.unsqueeze(1)
    elif features.dim() > 3:
        features = features.reshape(features.shape[0], features.shape[1], -1)
    bsz, n_views, dim = features.shape
    if bsz < 1 or n_views < 1 or dim < 1:
        raise ValueError(f"features must have at least one sample, view and feature, got shape {tuple(features.shape)}")
    return features


def _as_labels(name: str, labels) -> Tensor:
    """Labels as a tensor that torch.eq compares by value with any other label tensor, without NaN."""
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise ValueError(f"{name} must be a tensor or a sequence of numbers (integers within int64, or reals), "
                             f"got {type(labels).__name__} ({err})") from None
    _check_data(name, labels)
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"{name} must be a tensor of dtype bool, uint8, int8 to int64 or floating, got {labels.dtype}")
    return labels


def _check_nan_labels(name: str, labels: Tensor) -> Tensor:
    # torch.eq never matches NaN, not even with itself, so a NaN-labelled sample would have no positive,
    # not even its own other views; that is never what a caller means, so it is refused instead.
    if not labels.is_floating_point():
        return labels
    return require(labels, torch.isnan(labels), f"{name} must not contain NaN (NaN equals no label, not even "
                   "itself); give such samples a label of their own or leave them out")


def _check_labels(labels, bsz: int, device: torch.device) -> Tensor:
    labels = _as_labels("labels", labels)
    if labels.dim() > 2 or (labels.dim() == 2 and labels.shape[1] != 1):
        raise ValueError(f"labels must be a real tensor of shape [bsz] (or [bsz, 1]) with bsz = {bsz}, "
                         f"got shape {tuple(labels.shape)} and dtype {labels.dtype}")
    labels = labels.reshape(-1)
    if labels.numel() != bsz:
        raise ValueError(f"labels must have one entry per sample: expected {bsz}, got {labels.numel()}")
    return _check_nan_labels("labels", labels).to(device)


def _common_labels(labels: Tensor, more_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Both label vectors in one dtype, promoted as torch.eq compares them (never the one cast to the
    other's dtype, which would truncate 0.5 to 0 or wrap 256 around in int8); gather and ring modes alike."""
    common = torch.promote_types(labels.dtype, more_labels.dtype)
    return labels.to(common), more_labels.to(device=labels.device, dtype=common)


def dense_ids(labels: Tensor) -> tuple[Tensor, int]:
    """Each label's rank among the distinct values (torch.unique's inverse) and a bound C on their number.
    One sort on the device: a label starts a new class where it differs from its predecessor in sorted
    order. Eagerly C is the exact count (one host read); under torch.compile it is the number of labels,
    which bounds it without reading anything (the per-class tables are then a little larger)."""
    sorted_labels, order = torch.sort(labels)
    starts = torch.cat([torch.ones(1, dtype=torch.long, device=labels.device),
                        (sorted_labels[1:] != sorted_labels[:-1]).long()])
    sorted_ids = torch.cumsum(starts, 0) - 1
    ids = torch.empty_like(sorted_ids).scatter_(0, order, sorted_ids)
    return ids, labels.shape[0] if compiling() else int(sorted_ids[-1]) + 1


def _class_ids(labels, bsz: int, device: torch.device, more_labels: Optional[Tensor] = None) -> tuple[Tensor, int]:
    """Labels as class ids in [0, C) and C; ``more_labels`` (extra keys') are numbered with them, after them."""
    labels = _check_labels(labels, bsz, device)
    if more_labels is not None:
        labels = torch.cat(_common_labels(labels, more_labels))
    return dense_ids(labels)


def _positive_mask(mask, bsz: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    if mask.shape != (bsz, bsz):
        raise ValueError(f"mask must have shape [bsz, bsz] = [{bsz}, {bsz}], got {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"mask must be a bool or real tensor of non-negative weights, got dtype {mask.dtype}")
    mask = mask.to(device).contiguous()  # the fused kernels read the mask's rows with column stride 1
    weights = mask.to(dtype)
    if compiling():  # float weights (whether 0/1 is a question about values), checked when the graph runs
        return require(weights, ~torch.isfinite(weights) | (weights < 0),
                       "mask must hold finite, non-negative weights (1 marks a positive pair)")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("mask must hold finite, non-negative weights (1 marks a positive pair)")
    # A 0/1 mask travels as bytes (what the fused kernels read tile by tile); other weights as floats.
    if mask.dtype == torch.bool or bool(((weights == 0) | (weights == 1)).all()):
        return mask.to(torch.uint8)
    return weights


def _extra_keys(extra_keys, extra_key_labels, features: Tensor, name: str = "extra_keys",
                rows: str = "E", labelled: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Validated keys that are not anchors: ([E, D] in the features' dtype, [E] labels, or None when
    ``labelled`` is False: keys that are negatives of every anchor)."""
    if not isinstance(extra_keys, Tensor) or extra_keys.dim() != 2 or extra_keys.shape[1] != features.shape[-1]:
        shape = tuple(extra_keys.shape) if isinstance(extra_keys, Tensor) else type(extra_keys).__name__
        raise ValueError(f"{name} must be a tensor of shape [{rows}, D] with D = {features.shape[-1]} (the features' "
                         f"dimension), got {shape}")
    _check_data(name, extra_keys)
    if extra_keys.dtype != features.dtype or extra_keys.device != features.device:
        raise ValueError(f"{name} must have the features' dtype and device ({features.dtype}, {features.device}), "
                         f"got {extra_keys.dtype} on {extra_keys.device}")
    if not labelled:
        if extra_key_labels is not None:
            raise ValueError(f"extra_key_labels must be None here: without labels (SimCLR), {name} are negatives of "
                             "every anchor")
        _check_finite(**{name: extra_keys})
        return extra_keys, None
    if extra_key_labels is None:
        raise ValueError(f"{name} needs extra_key_labels: one label per extra key, compared with the samples' labels")
    extra_key_labels = _as_labels("extra_key_labels", extra_key_labels).reshape(-1)
    if extra_key_labels.numel() != extra_keys.shape[0]:
        raise ValueError(f"extra_key_labels must have one entry per row of {name}: expected {extra_keys.shape[0]}, "
                         f"got {extra_key_labels.numel()}")
    extra_key_labels = _check_nan_labels("extra_key_labels", extra_key_labels)
    _check_finite(**{name: extra_keys})
    return extra_keys, extra_key_labels.to(features.device)


def _check_weight(weight, shapes: list, device: torch.device, what: str) -> Optional[Tensor]:
    """Per-sample weights: None, or a floating tensor of one of ``shapes`` on ``device`` holding finite
    values >= 0 (checked when the graph runs under torch.compile)."""
    if weight is None:
        return None
    allowed = " or ".join(f"[{', '.join(map(str, shape))}]" for shape in shapes)
    if not isinstance(weight, Tensor):
        raise ValueError(f"weight must be a floating tensor of shape {allowed} ({what}), got {type(weight).__name__}")
    _check_data("weight", weight)
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor ({what}), got dtype {weight.dtype}")
    if tuple(weight.shape) not in [tuple(shape) for shape in shapes]:
        raise ValueError(f"weight must have shape {allowed} ({what}), got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight must be on the features' device ({device}), got {weight.device}")
    values = weight.detach()
    return require(weight, ~torch.isfinite(values) | (values < 0), "weight must hold finite values >= 0")


def _view_weight(weight, features: Tensor, contrast_mode: str) -> Optional[Tensor]:
    """A view-stacked loss's weights, validated: [bsz] (every anchor view of the sample), or [bsz, n_views]
    (per view) with contrast_mode="all"."""
    bsz, n_views, _ = features.shape
    shapes = [(bsz,)] + ([(bsz, n_views)] if contrast_mode == "all" else [])
    return _check_weight(weight, shapes, features.device, "one per sample" + (", or per view" if len(shapes) > 1 else ""))


def _anchor_weight(weight: Optional[Tensor], views: int) -> Optional[Tensor]:
    """Per-sample weights as one per anchor row (view-major: row v * bsz + b is view v of sample b)."""
    if weight is None:
        return None
    return weight.repeat(views) if weight.dim() == 1 else weight[:, :views].transpose(0, 1).reshape(-1)


def _reduced(spec: ContrastSpec, reduction: str, weight: Optional[Tensor], views: int) -> ContrastSpec:
    """The spec with its reduction and one weight per anchor row (``views`` anchor views per sample)."""
    return dataclasses.replace(spec, reduction=reduction, row_weight=_anchor_weight(weight, views))


def _views_layout(result: Tensor, reduction: str, views: int, contrast_mode: str = "all") -> Tensor:
    """reduction="none": the view-major rows as [bsz, n_views] (contrast_mode="all") or [bsz] ("one")."""
    if reduction != "none" or contrast_mode == "one":
        return result
    return result.reshape(views, -1).transpose(0, 1)


_REDUCTION_DOC = """
    ``reduction``: ``"mean"`` (default) sum_i w_i L_i / sum_i w_i over the counted anchors (0 when that sum
    is 0), ``"sum"`` sum_i w_i L_i, ``"none"`` the per-anchor losses w_i L_i ({layout}); an anchor without
    positives has L_i = 0. ``weight`` (optional): finite weights >= 0, {weight}; None means 1, which gives
    the unweighted loss. With ``process_group``, "mean" / "sum" are the global ones and "none" returns this
    rank's rows (every gradient world_size x this rank's share, as for the mean); the weights then get no
    gradient of their own."""
VIEWS_REDUCTION_DOC = _REDUCTION_DOC.format(
    layout='``[bsz, n_views]`` with contrast_mode="all", ``[bsz]`` with "one"',
    weight='``[bsz]`` (each of the sample\'s anchor views gets it) or ``[bsz, n_views]`` (per view, contrast_mode="all")')
PAIRS_REDUCTION_DOC = _REDUCTION_DOC.format(
    layout="``[B]``; a symmetric loss gives the mean of pair i's two directions, so ``.mean()`` equals \"mean\"",
    weight="``[B]``, one per pair (both directions of a symmetric loss)")


def supcon_spec(features, labels=None, mask=None, *, temperature=0.07, base_temperature=None,
                contrast_mode="all", no_positive="zero", normalize=False, variant="out",
                temperature_value: Optional[float] = None, extra_keys=None, extra_key_labels=None) -> ContrastSpec:
    """Validate SupCon arguments and describe the loss (no computation)."""
    features = _flatten_views(features)
    temperature = _check_temperature("temperature", temperature, known_value=temperature_value)
    tau_float = temperature if not isinstance(temperature, Tensor) else (
        tau_unknown(temperature) if temperature_value is None else temperature_value)
    acc = _accum_dtype(features)
    if not math.isnan(tau_float):  # NaN: unknown while tracing, checked by the op (the same range)
        _check_inverse("temperature", tau_float, acc)
    base_temperature = _check_base_temperature(base_temperature)
    if base_temperature is not None and not math.isnan(tau_float):
        _check_scale("base_temperature", tau_float / base_temperature, acc,
                     "the loss scale temperature / base_temperature", overflows="the loss")
    _check_finite(features=features)
    _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
    _check_choice("no_positive", no_positive, NO_POSITIVE_MODES)
    _check_choice("normalize", normalize, (False, True))
    _check_choice("variant", variant, VARIANTS)
    if labels is not None and mask is not None:
        raise ValueError("pass either labels or mask, not both")
    if extra_keys is None and extra_key_labels is not None:
        raise ValueError("extra_key_labels was given without extra_keys")
    bsz, n_views, _ = features.shape
    device = features.device
    # View-major stacking: row v * bsz + b is view v of sample b (SupContrast's cat(unbind(., 1))).
    keys = features.transpose(0, 1).reshape(n_views * bsz, -1)
    if extra_keys is not None:
        if mask is not None:
            raise ValueError("extra_keys needs labels (positives by label), not a [bsz, bsz] mask")
        # Without labels and mask (SimCLR), extra keys without labels are negatives of every anchor (a queue).
        unlabelled = labels is None and extra_key_labels is None
        extra_keys, extra_key_labels = _extra_keys(extra_keys, extra_key_labels, features, labelled=not unlabelled)
        keys = append_keys(keys, extra_keys)  # the extra keys follow the views; they are never anchors
    anchors = keys if contrast_mode == "all" and extra_keys is None else keys[: bsz * (n_views if contrast_mode == "all" else 1)]
    key_labels = anchor_labels = dense = None
    num_classes = 0
    if mask is not None:
        if isinstance(mask, Tensor):
            _check_data("mask", mask)
        dense = _positive_mask(mask, bsz, device, acc)
    else:
        if extra_keys is not None and extra_key_labels is None:  # SimCLR with a queue: one class no sample has
            ids, num_classes = torch.arange(bsz, device=device), bsz + 1
            extra_ids = torch.full((extra_keys.shape[0],), bsz, device=device)
        elif extra_keys is not None:
            if labels is None:
                raise ValueError("extra_key_labels needs labels: labelled extra keys are positives of the samples "
                                 "sharing their label")
            ids, num_classes = _class_ids(labels, bsz, device, extra_key_labels)
            ids, extra_ids = ids[:bsz], ids[bsz:]
        elif labels is None:  # SimCLR: the positives of a view are the other views of its sample
            ids, num_classes = torch.arange(bsz, device=device), bsz
        else:
            ids, num_classes = _class_ids(labels, bsz, device)
        key_labels = ids.repeat(n_views)
        if extra_keys is not None:
            key_labels = torch.cat([key_labels, extra_ids])
        anchor_labels = key_labels[: anchors.shape[0]]
    return ContrastSpec(
        anchors=anchors, keys=keys, self_offset=0,
        anchor_labels=anchor_labels, key_labels=key_labels, num_classes=num_classes, mask=dense,
        temperature=temperature, base_temperature=base_temperature, no_positive=no_positive, normalize=normalize,
        tau_float=tau_float, variant=variant,
    )


@agreed
@deferred_errors
def supcon_loss(features, labels=None, mask=None, *, temperature=0.07, base_temperature=None,
                contrast_mode="all", no_positive="zero", normalize=False, variant="out", backend="auto",
                process_group=None, distributed="gather", extra_keys=None, extra_key_labels=None,
                reduction="mean", weight=None) -> Tensor:
    """Supervised contrastive loss (Khosla et al., L_out), SimCLR's NT-Xent without labels.

    features: ``[bsz, n_views, ...]`` (extra dims flattened) or flat ``[N, D]`` (one view).
    labels: ``[bsz]`` class of each sample, or mask: ``[bsz, bsz]`` positive weights
    (``mask[i, j] = 1`` when sample j is a positive of sample i; may be asymmetric).
    Neither: SimCLR (the other views of a sample are its positives).
    The features are used as given (normalise them first, as SupContrast expects), or
    ``normalize=True`` L2-normalises each view's row first (F.normalize semantics, in fp32 for 16-bit inputs).
    ``base_temperature=None`` means equal to ``temperature`` (loss scale 1).
    ``no_positive``: an anchor without positives has loss exactly 0; ``"zero"`` keeps it
    in the mean (SupContrast), ``"exclude"`` leaves it out (pytorch-metric-learning).
    ``variant``: ``"out"`` (SupCon's L_out, the default and SupContrast's loss: mean over positives of
    their log-probabilities) or ``"in"`` (L_in: log of the mean positive probability).
    ``process_group``: a torch.distributed group; each rank passes its local batch and gets the
    loss of the global batch (ranks' batches concatenated in rank order), with every gradient
    equal to world_size x its share of the global gradient, so that DDP's averaging matches
    single-process training exactly (see ``fused_contrastive.distributed``). ``distributed="gather"``
    all-gathers the keys (O(global N · D) per rank); ``"ring"`` passes them around the ring instead, one
    rank's keys at a time (for when the gathered keys themselves do not fit; extra keys stay home): same
    results.
    ``extra_keys [E, D]`` with ``extra_key_labels [E]``: labelled keys that are never anchors (a memory
    bank or a labelled MoCo queue, PaCo-style class centers, TSC targets): positives of the samples sharing
    their label, in every anchor's denominator; they get gradients only if they require grad. Without
    labels and mask (SimCLR), ``extra_keys`` alone are negatives of every anchor (an unlabelled queue).
    ``fused_contrastive.MemoryBankLoss`` keeps such a bank (a FIFO of past batches) for you.
    Labels of any real dtype (and extra_key_labels) compare by value as ``torch.eq`` does, in their promoted
    dtype; NaN labels are refused (NaN equals nothing, so such a sample would have no positive at all).
    Non-finite features give a non-finite loss, as torch's losses do; set FUSED_CONTRASTIVE_CHECK_FINITE=1 to
    get a ValueError instead (a host sync per input). A temperature whose inverse overflows the accumulation
    dtype (fp32 for fp32/fp16/bf16 features) is refused.
    Returns the mean over anchors (see ``reduction``), in float32 (float64 for float64 features). Works under
    ``torch.compile(fullgraph=True)`` (as one custom op, fused_contrastive.compiled; extra keys too, a
    process group not) and under autocast (the loss always accumulates in fp32, whatever autocast would pick).

    Example:
        >>> import torch, fused_contrastive as fc
        >>> features = torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1).requires_grad_()
        >>> loss = fc.supcon_loss(features, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), temperature=0.1)
        >>> loss.backward()
    """
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    _check_choice("reduction", reduction, REDUCTIONS)
    if process_group is not None and compiling():
        raise ValueError("process_group cannot be combined with torch.compile in this version (compile the model, "
                         "call the loss outside the compiled region)")
    flat = _flatten_views(features)
    views = 1 if contrast_mode == "one" else flat.shape[1]
    if contrast_mode in CONTRAST_MODES:  # else supcon_spec names contrast_mode
        weight = _view_weight(weight, flat, contrast_mode)
    kwargs = dict(temperature=temperature, base_temperature=base_temperature, contrast_mode=contrast_mode,
                  no_positive=no_positive, normalize=normalize, variant=variant, extra_keys=extra_keys,
                  extra_key_labels=extra_key_labels)
    spec = supcon_spec(features, labels, mask, **kwargs)  # validates the local inputs before any communication
    _check_choice("distributed", distributed, ("gather", "ring"))
    if process_group is None:
        return _views_layout(compiled.run(_reduced(spec, reduction, weight, views), backend), reduction, views,
                             contrast_mode)
    if mask is not None:
        raise ValueError("mask cannot be combined with process_group (a [bsz, bsz] mask is local); pass labels")
    return _gathered_views(process_group, features, labels, contrast_mode, backend,
                           lambda f, y: supcon_spec(f, y, temperature=spec.temperature, temperature_value=spec.tau_float,
                                                    **{k: v for k, v in kwargs.items() if k != "temperature"}),
                           reduction, weight, mode=distributed)


def _gathered_views(process_group, features, labels, contrast_mode: str, backend: str, build,
                    reduction: str = "mean", weight: Optional[Tensor] = None, mode: str = "gather",
                    sample_stat=None) -> Tensor:
    """A view-stacked loss over the global batch: gather features (and labels, weights), ``build(features,
    labels)`` the global spec, run this rank's anchor rows (see fused_contrastive.distributed). ``mode="ring"``:
    the same ``build`` on the global labels, the features passed around the ring instead (``sample_stat``: see
    distributed.ring_views)."""
    from . import distributed

    features = _flatten_views(features)
    if labels is not None:
        labels = _check_labels(labels, features.shape[0], features.device)
    views = features.shape[1] if contrast_mode == "all" else 1
    if mode == "ring":
        result = distributed.ring_views(build, features, labels, contrast_mode=contrast_mode, group=process_group,
                                        backend=backend, sample_stat=sample_stat,
                                        reduce=lambda spec, w: _reduced(spec, reduction, w, views), weight=weight)
        return _views_layout(result, reduction, views, contrast_mode)
    batch = distributed.gather_batch(process_group, features, labels, weight)
    spec = build(*batch.tensors[:2])
    spec = _reduced(spec, reduction, batch.tensors[2], views)
    result = distributed.run_rows(spec, distributed.view_ranges(batch, views), process_group, backend)
    return _views_layout(result, reduction, views, contrast_mode)


def _show(value) -> str:
    """A setting for extra_repr: tensors by value when they hold one number, else by shape and dtype."""
    if not isinstance(value, Tensor):
        return repr(value)
    kind = "Parameter" if isinstance(value, nn.Parameter) else "tensor"
    if value.numel() == 1 and value.device.type != "meta":
        return f"{kind}({float(value.detach()):.4g})"
    return f"{kind}(shape={tuple(value.shape)}, dtype={value.dtype})"


def _choice(options):
    return lambda name, value: _check_choice(name, value, options)


# The settings every loss module shares, checked by name in _LossModule.__init__.
_SHARED_SETTING_CHECKS = {"temperature": _check_temperature, "normalize": _choice((False, True)),
                          "backend": _choice(dispatch.BACKEND_CHOICES), "distributed": _choice(("gather", "ring")),
                          "reduction": _choice(REDUCTIONS)}


class _LossModule(nn.Module):
    """What every loss module shares: its settings (the functional form's non-per-call arguments) stored as
    attributes, tensors among them registered (an ``nn.Parameter`` as a parameter, a plain tensor as a buffer,
    so that ``parameters()``, ``state_dict()`` and ``.to()`` see them); ``kwargs`` gives them back as the
    function's keyword arguments; ``extra_repr`` lists them. Each subclass validates its arguments in
    ``__init__`` with the checks its function uses and calls ``fn`` in ``forward``."""

    fn = None  # the functional form

    def __init__(self, **settings):
        """Validate the settings every loss shares by name (temperature, normalize, backend, distributed,
        reduction: a ValueError naming a bad one; the subclass checks its own first) and store them; see the
        class docstring."""
        super().__init__()
        for name, check in _SHARED_SETTING_CHECKS.items():
            if name in settings:
                check(name, settings[name])
        self._setting_names = tuple(settings)
        for name, value in settings.items():
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            elif isinstance(value, Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)

    def forward(self, *tensors: Tensor) -> Tensor:
        """The loss of this call's tensors (see the class docstring), computed by ``fn`` with the settings."""
        raise NotImplementedError

    @property
    def kwargs(self) -> dict:
        """The settings as keyword arguments of ``fn`` (tensors as currently registered)."""
        return {name: getattr(self, name) for name in self._setting_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={_show(value)}" for name, value in self.kwargs.items())


def _one_of(name: str, stored, given):
    """A tensor the module may own (given at construction) or receive per call: one of the two."""
    if stored is not None and given is not None:
        raise ValueError(f"{name} was given both at construction and to forward; give it once")
    return given if stored is None else stored


class SupConLoss(_LossModule):
    """Drop-in for SupContrast's ``SupConLoss``: same constructor (``temperature, contrast_mode,
    base_temperature`` in that order, the same defaults) and ``forward(features, labels=None, mask=None)``.

    ``L = -(temperature / base_temperature) * mean_i (1/|P_i|) sum_{p in P_i} log(exp(l_ip) / sum_{j != i}
    exp(l_ij))`` with ``l_ij = z_i . z_j / temperature``; see ``supcon_loss`` for every argument.
    ``features [bsz, n_views, D]`` (or ``[N, D]``), ``labels [bsz]`` or ``mask [bsz, bsz]``, ``weight`` (per
    sample or per view); returns a scalar, or the per-anchor losses with ``reduction="none"``.
    Unlike ``supcon_loss`` (``base_temperature=None``: loss scale 1), ``base_temperature`` defaults to 0.07
    as SupContrast's constructor does. A tensor ``temperature`` is registered: an ``nn.Parameter`` as a
    parameter (learned), any other tensor as a buffer.

    Example:
        >>> import torch, fused_contrastive as fc
        >>> criterion = fc.SupConLoss(temperature=0.1)
        >>> features = torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1).requires_grad_()
        >>> loss = criterion(features, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        >>> loss.backward()
    """

    fn = staticmethod(supcon_loss)

    def __init__(self, temperature=0.07, contrast_mode="all", base_temperature=0.07, *, no_positive="zero",
                 normalize=False, variant="out", backend="auto", process_group=None, distributed="gather",
                 reduction="mean"):
        _check_base_temperature(base_temperature)
        _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
        _check_choice("no_positive", no_positive, NO_POSITIVE_MODES)
        _check_choice("variant", variant, VARIANTS)
        super().__init__(temperature=temperature, contrast_mode=contrast_mode, base_temperature=base_temperature,
                         no_positive=no_positive, normalize=normalize, variant=variant, backend=backend,
                         process_group=process_group, distributed=distributed, reduction=reduction)

    def forward(self, features: Tensor, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None, *,
                extra_keys: Optional[Tensor] = None, extra_key_labels: Optional[Tensor] = None,
                weight: Optional[Tensor] = None) -> Tensor:
        return supcon_loss(features, labels, mask, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                           weight=weight, **self.kwargs)


supcon_loss.__doc__ = supcon_loss.__doc__.replace("\n\n    Example:", VIEWS_REDUCTION_DOC + "\n\n    Example:", 1)
