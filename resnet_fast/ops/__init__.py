"""Functional API of the fused unit ``conv -> BatchNorm -> (+ residual) -> (ReLU)``.

Every backend computes exactly what the stock layers compute::

    y = F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    out = F.relu(y + residual)
"""

from __future__ import annotations

import functools
import importlib
import sys
from types import ModuleType
from typing import Optional, Sequence, Union

import torch

from resnet_fast import backends
from resnet_fast.ops import trace
from resnet_fast.ops.folding import ConvGeometry, FoldedConv, fold_conv_bn, pair

__all__ = ["conv_bn_act", "conv_bias_act", "bn_act_train", "fold_conv_bn", "ConvGeometry", "FoldedConv",
           "conv_bn_act_train", "check_unit_inputs", "autocast_dtype", "autocast_inputs",
           "update_running_stats", "backend_module",
           "momentum_factor", "content_fingerprint", "content_fingerprint_available"]

_IntOrPair = Union[int, Sequence[int]]
_MODULES = {"reference": "resnet_fast.ops.reference", "extension": "resnet_fast.ops.extension",
            "triton": "resnet_fast.ops.triton"}


_loaded: dict[str, ModuleType] = {}


def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name`` (``conv_bias_act`` and ``bn_act_train``), imported once."""
    module = _loaded.get(name) or sys.modules.get(_MODULES[name])  # torch.compile traces a sys.modules look-up
    if module is None:
        module = importlib.import_module(_MODULES[name])
    _loaded[name] = module
    return module


@functools.lru_cache(maxsize=None)
def content_fingerprint_available() -> bool:
    """Whether :func:`content_fingerprint` has its compiled CPU kernel (``resnet_fast._C``); asked once
    per process (the fold cache asks on every eval call)."""
    from resnet_fast import _extension

    return _extension.extension() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "resnet_fast::content_fingerprint", "CPU")


def content_fingerprint(tensors: Sequence[torch.Tensor]) -> int:
    """A 64-bit fingerprint of the CPU tensors' bytes: equal bytes give equal values, and any edit
    (in place, through ``.data``, a permutation) changes it with overwhelming probability.

    Equivalent PyTorch (slower, same purpose): ``hash(tuple(t.numpy().tobytes() for t in tensors))``.
    """
    from resnet_fast import _op_schemas  # noqa: F401  (schema)

    return torch.ops.resnet_fast.content_fingerprint(list(tensors))


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def conv_output_shape(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry) -> tuple[int, int, int, int]:
    """(N, C_out, H_out, W_out) of ``F.conv2d(x, weight, ...)`` with ``geometry``."""
    sizes = []
    for dim in (0, 1):
        span = geometry.dilation[dim] * (weight.shape[2 + dim] - 1) + 1
        sizes.append((x.shape[2 + dim] + 2 * geometry.padding[dim] - span) // geometry.stride[dim] + 1)
    return (x.shape[0], weight.shape[0], sizes[0], sizes[1])


def _check_batch_statistics(shape: Sequence[int]) -> None:
    """Training-mode BatchNorm needs more than one value per channel, as ``F.batch_norm`` insists."""
    values_per_channel = shape[0] * shape[2] * shape[3]
    if values_per_channel <= 1:
        raise ValueError(f"training-mode BatchNorm needs more than 1 value per channel, got input of shape "
                         f"{tuple(shape)}")


def check_unit_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    per_channel: dict[str, Optional[torch.Tensor]],
    residual: Optional[torch.Tensor],
    geometry: ConvGeometry,
) -> tuple[int, ...]:
    """Validate one fused unit's inputs; return the output shape. Every message names the problem."""
    for name, t in [("input", x), ("weight", weight)]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-d (N, C, H, W), got {x.dim()}-d of shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"conv weight must be 4-d (C_out, C_in/groups, kH, kW), got shape {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"input dtype {x.dtype} does not match conv weight dtype {weight.dtype}; "
                        "convert the model or the input (e.g. model.to(x.dtype))")
    if weight.device != x.device:
        raise ValueError(f"input is on {x.device} but the conv weight is on {weight.device}")
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    groups = geometry.groups
    if groups < 1 or out_channels % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide the {out_channels} output channels")
    if x.shape[1] != in_per_group * groups:
        raise ValueError(f"input has {x.shape[1]} channels but the conv expects {in_per_group * groups} "
                         f"(weight {tuple(weight.shape)}, groups={groups})")
    for name, t in per_channel.items():
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != out_channels:
            raise ValueError(f"{name} must have shape ({out_channels},) to match the conv's output channels, "
                             f"got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    out_shape = conv_output_shape(x, weight, geometry)
    if min(out_shape[2:]) < 1:
        raise ValueError(f"input spatial size {tuple(x.shape[2:])} is too small for a "
                         f"{weight.shape[2]}x{weight.shape[3]} kernel with padding {geometry.padding} "
                         f"and dilation {geometry.dilation}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but the conv output has shape {out_shape}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} does not match input dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but the input is on {x.device}")
    return out_shape


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs convolutions in on ``x``'s device, or None when autocast is off."""
    device_type = x.device.type
    if not x.is_floating_point() or device_type not in ("cpu", "cuda"):
        return None
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if enabled else None
    except TypeError:  # torch < 2.4: per-device functions
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
        dtype = (torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()) \
            if enabled else None
    return dtype


def autocast_inputs(
    x: torch.Tensor, weight: torch.Tensor, conv_bias: Optional[torch.Tensor], residual: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Under ``torch.autocast``, the conv operands and the residual in the autocast dtype (as stock conv does);
    BatchNorm parameters and statistics stay in their own dtype."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return x, weight, conv_bias, residual
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    return cast(x), cast(weight), cast(conv_bias), cast(residual)


def momentum_factor(momentum: Optional[float], num_batches_tracked: Optional[torch.Tensor]) -> float:
    """The running-stat factor of ``nn.BatchNorm2d``; bumps ``num_batches_tracked`` when given."""
    if num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative moving average) needs num_batches_tracked")
    return 1.0 / float(num_batches_tracked.item())


def update_running_stats(
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, variance unbiased, as ``nn.BatchNorm2d``."""
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        unbiased = batch_var * (count / max(count - 1, 1))
        running_mean.mul_(1 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def conv_bias_act(
    x: torch.Tensor,
    folded: FoldedConv,
    residual: Optional[torch.Tensor] = None,
    relu: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Inference unit on an already folded conv: ``relu(conv2d(x, folded.weight, folded.bias) + residual)``."""
    name = backends.resolve(backend, x.device)
    if x.shape[0] == 0:
        name = "reference"  # nothing to compute; the stock ops return the empty result
    before = trace.recorded()
    out = backend_module(name).conv_bias_act(x, folded, residual, relu)
    _record_backend(before, name)
    return out


def _record_backend(before: int, name: str) -> None:
    """For an open ``trace.recording()``: the backend's name where its module recorded no kernel."""
    if trace.recording_open() and trace.recorded() == before:
        trace.record(name, f"the {name} backend's kernels" + (" (selected per layer, ops/triton/select.py)"
                                                              if name == "triton" else ""))


def bn_act_train(
    y: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    relu: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Training unit on a conv output ``y``: batch-statistics BatchNorm, ``+ residual``, ReLU.

    Equivalent PyTorch::

        out = F.batch_norm(y, running_mean, running_var, weight, bias, training=True, momentum=momentum, eps=eps)
        out = F.relu(out + residual)
    """
    _check_batch_statistics(y.shape)
    name = backends.resolve(backend, y.device)
    return backend_module(name).bn_act_train(y, weight, bias, running_mean, running_var, momentum, eps, residual, relu)


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    *,
    conv_bias: Optional[torch.Tensor] = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    eps: float = 1e-5,
    momentum: Optional[float] = 0.1,
    training: bool = False,
    residual: Optional[torch.Tensor] = None,
    relu: bool = True,
    num_batches_tracked: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Fused ``Conv2d -> BatchNorm2d -> (+ residual) -> (ReLU)``.

    In training mode (or without running statistics) BatchNorm uses batch
    statistics and updates ``running_mean``/``running_var`` (and
    ``num_batches_tracked``) in place exactly as ``nn.BatchNorm2d``; otherwise
    BatchNorm is folded into the conv.

    Equivalent PyTorch::

        y = F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups)
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
        out = F.relu(y + residual) if relu else y + residual
    """
    geometry = ConvGeometry(pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"), int(groups))
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        x, weight, conv_bias, residual = autocast_inputs(x, weight, conv_bias, residual)
    check_unit_inputs(x, weight, {"conv_bias": conv_bias, "bn_weight": bn_weight, "bn_bias": bn_bias,
                                  "running_mean": running_mean, "running_var": running_var}, residual, geometry)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if training or running_mean is None:
        update = training and running_mean is not None
        factor = momentum_factor(momentum, num_batches_tracked) if update else 0.0
        stats = (running_mean, running_var) if update else (None, None)
        return conv_bn_act_train(x, weight, conv_bias, geometry, bn_weight, bn_bias, *stats, factor, eps, residual,
                                 relu, backend)
    folded = fold_conv_bn(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, geometry, x.dtype)
    return conv_bias_act(x, folded, residual, relu, backend)


def conv_bn_act_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    geometry: ConvGeometry,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    relu: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Training unit from the conv input: conv, batch-statistics BatchNorm, ``+ residual``, ReLU.

    A backend module may provide its own ``conv_bn_act_train`` (e.g. statistics in
    the conv epilogue); otherwise the conv is the vendor one (cuDNN / oneDNN, with
    its own autograd) followed by the backend's ``bn_act_train``.

    Equivalent PyTorch::

        y = F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups)
        out = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps)
        out = F.relu(out + residual)
    """
    if x.shape[0] == 0:
        raise ValueError("training-mode BatchNorm needs a non-empty batch, got batch size 0")
    _check_batch_statistics(conv_output_shape(x, weight, geometry))
    name = backends.resolve(backend, x.device)
    module = backend_module(name)
    before = trace.recorded()
    if hasattr(module, "conv_bn_act_train"):
        out = module.conv_bn_act_train(x, weight, conv_bias, geometry, bn_weight, bn_bias, running_mean,
                                       running_var, momentum, eps, residual, relu)
    else:
        from resnet_fast.ops.reference import conv2d

        y = conv2d(x, weight, conv_bias, geometry)
        out = bn_act_train(y, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual, relu, name)
    _record_backend(before, name)
    return out
