"""Module-level fused units: ``nn.Conv2d`` + ``nn.BatchNorm2d`` (+ residual) (+ ReLU).

:func:`conv_bn_unit` runs one unit from the stock modules that own its
parameters, so a model keeps torchvision's module names and state_dict keys.
In eval mode the folded weights are cached on the BatchNorm module and rebuilt
whenever any parameter or buffer of the pair changes, or after :func:`clear_fold_cache`.
A change is seen through the tensors' identity, version counter, dtype, device and shape,
and (``RESNET_FAST_WEIGHT_CHECK=content``, the default) their contents: writes through
``.data`` and edits of inference tensors bump no version counter.

The norm layer decides how a unit runs (:func:`norm_kind`): ``nn.BatchNorm2d`` fused in
both modes, torchvision's ``FrozenBatchNorm2d`` folded like an eval-mode BatchNorm in both
modes, any other norm unfused through its own module.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from resnet_fast import ops, settings
from resnet_fast.ops import reference, sync_bn, trace
from resnet_fast.ops.folding import ConvGeometry, FoldedConv, fold_conv_bn, tensor_version

_CACHE_ATTR = "_resnet_fast_fold"


def weight_check() -> str:
    """How the fold cache sees edits of a unit's parameters and buffers (``RESNET_FAST_WEIGHT_CHECK``).

    ``content`` (default): version counters plus a fingerprint of the tensors' bytes, taken on each
    eval call (CPU; on other devices the fold is recomputed on each call), so writes through
    ``.data`` are seen too. ``version``: version counters, identity, dtype and shape only; faster,
    but an edit through ``.data`` then needs ``model.refresh()``.
    """
    return settings.value("weight_check")


def _frozen_batch_norm_type() -> Optional[type]:
    # A model that uses FrozenBatchNorm2d has imported torchvision; never import it here.
    misc = sys.modules.get("torchvision.ops.misc")
    return getattr(misc, "FrozenBatchNorm2d", None)


def norm_kind(norm: nn.Module) -> str:
    """How a unit with this norm layer runs.

    * ``"batch_norm"``: ``nn.BatchNorm2d``: batch statistics in training mode (fused
      statistics, running-stat update and backward), folded into the conv in eval mode;
    * ``"frozen"``: torchvision's ``FrozenBatchNorm2d``: always folded (it has no training mode);
    * ``"unfused"``: any other module (``GroupNorm``, ``SyncBatchNorm``, a custom norm):
      ``conv -> norm -> (+ residual) -> relu`` through the stock modules.
    """
    if isinstance(norm, nn.BatchNorm2d) and not isinstance(norm, nn.SyncBatchNorm):
        return "batch_norm"
    frozen = _frozen_batch_norm_type()
    if frozen is not None and isinstance(norm, frozen):
        return "frozen"
    return "unfused"


def folds(norm: nn.Module) -> bool:
    """Whether a unit with this norm layer runs as a folded conv in the current mode."""
    kind = norm_kind(norm)
    if kind == "frozen":
        return True
    return kind == "batch_norm" and not (norm.training or not norm.track_running_stats or norm.running_mean is None)


def check_unit_modules(conv: nn.Module, bn: nn.Module) -> None:
    """Reject modules that the fused unit cannot reproduce exactly."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"fused units need an nn.Conv2d, got {type(conv).__name__}")
    if norm_kind(bn) == "unfused":
        raise TypeError(f"fused units need an nn.BatchNorm2d or FrozenBatchNorm2d, got {type(bn).__name__}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"fused units support zero padding given as ints, got padding={conv.padding!r}, "
                         f"padding_mode={conv.padding_mode!r}")
    features = bn.running_mean.numel() if getattr(bn, "num_features", None) is None else bn.num_features
    if conv.out_channels != features:
        raise ValueError(f"conv has {conv.out_channels} output channels but the norm layer has {features} features")


def geometry_of(conv: nn.Conv2d) -> ConvGeometry:
    return ConvGeometry(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def _fold_sources(conv: nn.Conv2d, bn: nn.Module) -> tuple[Optional[torch.Tensor], ...]:
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def _fold_key(sources: tuple[Optional[torch.Tensor], ...], eps: float, dtype: torch.dtype) -> Optional[tuple]:
    """What the fold depends on, or None where an edit could go unseen (then nothing is cached)."""
    key: list = [dtype, eps]
    for t in sources:
        if t is None:
            key.append(None)
            continue
        key.append((t.data_ptr(), tensor_version(t), t.dtype, t.device, tuple(t.shape), t.stride()))
    present = [t for t in sources if t is not None]
    if weight_check() == "content":
        if not all(t.device.type == "cpu" for t in present) or not ops.content_fingerprint_available():
            return None
        key.append(ops.content_fingerprint(present))
    elif any(t.is_inference() for t in present):
        return None  # inference tensors have no version counter
    return tuple(key)


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
    sources = _fold_sources(conv, bn)
    needs_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in sources)

    def fold() -> FoldedConv:
        return fold_conv_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            bn.eps, geometry_of(conv), dtype)

    if needs_grad or torch.compiler.is_compiling():
        return fold()
    key = _fold_key(sources, bn.eps, dtype)
    cached = bn.__dict__.get(_CACHE_ATTR)
    if key is not None and cached is not None and cached.key == key:
        return cached.folded
    # Outside inference mode, so the cached tensors have version counters and serve every later context.
    with torch.inference_mode(False), torch.no_grad():
        folded = fold()
    if key is None:
        bn.__dict__.pop(_CACHE_ATTR, None)
    else:
        bn.__dict__[_CACHE_ATTR] = _FoldCache(key, folded)
    return folded


def clear_fold_cache(module: nn.Module) -> None:
    """Drop every cached folded weight under ``module``."""
    for sub in module.modules():
        sub.__dict__.pop(_CACHE_ATTR, None)


def conv_bn_unit(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.Module,
    residual: Optional[torch.Tensor] = None,
    relu: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``relu(bn(conv(x)) + residual)`` with the modules' own parameters and state, fused
    where the norm layer allows (:func:`norm_kind`).

    Equivalent PyTorch::

        out = bn(conv(x))
        out = torch.relu(out + residual) if relu else out + residual
    """
    kind = norm_kind(bn)
    if kind == "unfused":
        trace.record("stock", f"{type(bn).__name__} is not fused: the stock modules run")
        return _stock_unit(x, conv, bn, residual, relu)
    x, weight, conv_bias, residual = ops.autocast_inputs(x, conv.weight, conv.bias, residual)
    if not folds(bn):
        geometry = geometry_of(conv)
        ops.check_unit_inputs(x, weight, {"bn_weight": bn.weight}, residual, geometry)
        # Sync-BN (resnet_fast.train.distributed.enable_sync_bn): statistics over all processes.
        group = bn.__dict__.get(sync_bn.SYNC_BN_ATTR) if bn.training else None
        synced = group is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
        update = bn.training and bn.track_running_stats and bn.running_mean is not None
        factor = ops.momentum_factor(bn.momentum, bn.num_batches_tracked) if update else 0.0
        stats = (bn.running_mean, bn.running_var) if update else (None, None)
        if synced:
            trace.record("vendor+sync_bn", "sync-BN: vendor conv, then statistics all-reduced over the process group")
            y = reference.conv2d(x, weight, conv_bias, geometry)
            return sync_bn.sync_bn_act_train(y, bn.weight, bn.bias, *stats, factor, bn.eps, residual, relu, group)
        return ops.conv_bn_act_train(x, weight, conv_bias, geometry, bn.weight, bn.bias, *stats, factor, bn.eps,
                                     residual, relu, backend)
    folded = folded_conv(conv, bn, x.dtype)
    ops.check_unit_inputs(x, folded.weight, {}, residual, folded.geometry)
    return ops.conv_bias_act(x, folded, residual, relu, backend)


def _stock_unit(x: torch.Tensor, conv: nn.Module, norm: nn.Module, residual: Optional[torch.Tensor],
                relu: bool) -> torch.Tensor:
    """The unit through its own modules, as torchvision's blocks call them."""
    out = norm(conv(x))
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


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
