"""Module-level fused units: ``nn.Conv2d`` + ``nn.BatchNorm2d`` (+ residual) (+ ReLU).

:func:`conv_bn_unit` runs one unit from the stock modules that own its
parameters, so a model keeps torchvision's module names and state_dict keys.
In eval mode the folded weights are cached on the BatchNorm module and rebuilt
whenever any parameter or buffer of the pair changes (tensor version counters,
storage, dtype or device), or after :func:`clear_fold_cache`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from resnet_fast import ops
from resnet_fast.ops.folding import ConvGeometry, FoldedConv, fold_conv_bn

_CACHE_ATTR = "_resnet_fast_fold"


def check_unit_modules(conv: nn.Module, bn: nn.Module) -> None:
    """Reject modules that the fused unit cannot reproduce exactly."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"fused units need an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d) or isinstance(bn, nn.SyncBatchNorm):
        raise TypeError(f"fused units need an nn.BatchNorm2d, got {type(bn).__name__}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"fused units support zero padding given as ints, got padding={conv.padding!r}, "
                         f"padding_mode={conv.padding_mode!r}")
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv has {conv.out_channels} output channels but BatchNorm has {bn.num_features} features")


def geometry_of(conv: nn.Conv2d) -> ConvGeometry:
    return ConvGeometry(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def _fold_key(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple:
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return (dtype, bn.eps) + tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)
                                   for t in tensors)


def _no_fold() -> None:
    return None


class _FoldCache:
    """One BN module's cached fold. Copies and pickles of a model leave it behind (they would
    otherwise copy oneDNN's opaque packed weights, which cannot be copied): it is rebuilt on first use."""

    __slots__ = ("key", "folded")

    def __init__(self, key: tuple, folded: FoldedConv) -> None:
        self.key = key
        self.folded = folded

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return _no_fold, ()


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> FoldedConv:
    """The conv with eval-mode BN folded in, cached while nothing it depends on has changed.

    The cache is bypassed while autograd needs gradients of the parameters (the
    fold is then part of the graph) and while ``torch.compile`` traces.
    """
    needs_grad = torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for p in (conv.weight, conv.bias, bn.weight, bn.bias))
    compiling = hasattr(torch, "compiler") and torch.compiler.is_compiling()

    def fold() -> FoldedConv:
        return fold_conv_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            bn.eps, geometry_of(conv), dtype)

    if needs_grad or compiling:
        return fold()
    key = _fold_key(conv, bn, dtype)
    cached = bn.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached.key == key:
        return cached.folded
    with torch.no_grad():
        folded = fold()
    bn.__dict__[_CACHE_ATTR] = _FoldCache(key, folded)
    return folded


def clear_fold_cache(module: nn.Module) -> None:
    """Drop every cached folded weight under ``module``."""
    for sub in module.modules():
        sub.__dict__.pop(_CACHE_ATTR, None)


def conv_bn_unit(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    residual: Optional[torch.Tensor] = None,
    relu: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``relu(bn(conv(x)) + residual)`` with the modules' own parameters and state, fused.

    Equivalent PyTorch::

        out = bn(conv(x))
        out = torch.relu(out + residual) if relu else out + residual
    """
    x, weight, conv_bias, residual = ops.autocast_inputs(x, conv.weight, conv.bias, residual)
    use_batch_stats = bn.training or not bn.track_running_stats or bn.running_mean is None
    if use_batch_stats:
        geometry = geometry_of(conv)
        ops.check_unit_inputs(x, weight, {"bn_weight": bn.weight}, residual, geometry)
        # Sync-BN (resnet_fast.train.distributed.enable_sync_bn): statistics over all processes.
        group = bn.__dict__.get("resnet_fast_process_group") if bn.training else None
        if group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            from resnet_fast.ops.reference import conv2d
            from resnet_fast.train.distributed import sync_bn_act_train

            return sync_bn_act_train(conv2d(x, weight, conv_bias, geometry), bn, residual, relu, group)
        update = bn.training and bn.track_running_stats and bn.running_mean is not None
        factor = ops.momentum_factor(bn.momentum, bn.num_batches_tracked) if update else 0.0
        stats = (bn.running_mean, bn.running_var) if update else (None, None)
        return ops.conv_bn_act_train(x, weight, conv_bias, geometry, bn.weight, bn.bias, *stats, factor, bn.eps,
                                     residual, relu, backend)
    folded = folded_conv(conv, bn, x.dtype)
    ops.check_unit_inputs(x, folded.weight, {}, residual, folded.geometry)
    return ops.conv_bias_act(x, folded, residual, relu, backend)


class ConvBNAct(nn.Module):
    """``Conv2d -> BatchNorm2d -> (+ residual) -> (ReLU)`` as one fused module.

    State dict keys are ``conv.*`` and ``bn.*``. Equivalent PyTorch::

        nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, dilation: int = 1, groups: int = 1, relu: bool = True,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, backend: Optional[str] = None) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True,
                     backend: Optional[str] = None) -> "ConvBNAct":
        """Wrap existing modules (shared, not copied)."""
        check_unit_modules(conv, bn)
        unit = cls.__new__(cls)
        nn.Module.__init__(unit)
        unit.conv, unit.bn, unit.relu, unit.backend = conv, bn, relu, backend
        return unit

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return conv_bn_unit(x, self.conv, self.bn, residual, self.relu, self.backend)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, backend={self.backend or 'auto'}"
