"""Folding an eval-mode BatchNorm into the preceding convolution.

``s = gamma / sqrt(running_var + eps)``, ``W' = W * s[:, None, None, None]``,
``b' = beta - running_mean * s (+ conv_bias * s)``, computed in float32 (float64
for float64 weights) and cast to the compute dtype afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

_Pair = tuple[int, int]


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """``t._version``, or None for an inference tensor (it has no version counter)."""
    return None if t.is_inference() else t._version


def pair(value, name: str) -> _Pair:
    """``3 -> (3, 3)``; ``(1, 2) -> (1, 2)``; anything else is a clear error."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


@dataclass
class ConvGeometry:
    """Stride, padding, dilation and groups of a 2-d convolution."""

    stride: _Pair = (1, 1)
    padding: _Pair = (0, 0)
    dilation: _Pair = (1, 1)
    groups: int = 1


@dataclass
class FoldedConv:
    """A convolution with BatchNorm folded in: ``conv2d(x, weight, bias, **geometry)``.

    ``packed`` holds backend-private forms of ``weight`` (pre-packed layouts),
    valid as long as this object is; it is dropped with the fold.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    geometry: ConvGeometry
    packed: dict[str, Any] = field(default_factory=dict)


def fold_conv_bn(
    weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    geometry: ConvGeometry,
    dtype: Optional[torch.dtype] = None,
) -> FoldedConv:
    """Fold eval-mode BatchNorm into the conv. Differentiable when autograd is on.

    Equivalent PyTorch::

        s = bn_weight / torch.sqrt(running_var + eps)
        w = weight * s[:, None, None, None]
        b = bn_bias - running_mean * s + (conv_bias * s if conv_bias is not None else 0)
    """
    dtype = dtype or weight.dtype
    acc = torch.float64 if torch.float64 in (weight.dtype, dtype) else torch.float32
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    bias = -running_mean.to(acc) * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(acc)
    if conv_bias is not None:
        bias = bias + conv_bias.to(acc) * scale
    folded_weight = (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(dtype)
    return FoldedConv(weight=folded_weight, bias=bias.to(dtype), geometry=geometry)
