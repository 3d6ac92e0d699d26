"""The reference backend: plain PyTorch ops. Ground truth for the other backends and the universal fallback."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from resnet_fast.ops.folding import ConvGeometry, FoldedConv


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], geometry: ConvGeometry) -> torch.Tensor:
    return F.conv2d(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)


def conv_bias_act(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """Inference unit with BN folded in.

    Equivalent PyTorch: ``relu(conv2d(x, folded.weight, folded.bias) + residual)``.
    """
    out = conv2d(x, folded.weight, folded.bias, folded.geometry)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def bn_act_train(
    y: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
    eps: float,
    residual: Optional[torch.Tensor],
    relu: bool,
) -> torch.Tensor:
    """Training-mode BatchNorm with batch statistics, then ``+ residual`` and ReLU.

    Updates ``running_mean``/``running_var`` in place (unbiased variance) with
    factor ``momentum`` when they are given, exactly as ``nn.BatchNorm2d``.
    """
    out = F.batch_norm(y, running_mean, running_var, weight, bias, training=True, momentum=momentum, eps=eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out
