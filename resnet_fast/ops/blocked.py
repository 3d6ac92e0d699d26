"""CPU float32 inference on activations in 8-channel blocks, ``(N, C/8, H, W, 8)``.

channels_last keeps all C channels of a pixel together; the blocked layout keeps 8 channels of
consecutive pixels together, so the operand of a 1x1 convolution's inner loop (6 pixels x 8
channels) is one contiguous run instead of 6 rows C floats apart. On this project's AVX2 machine
the extension's blocked 1x1 convolution is 1.03-1.43x faster than oneDNN's channels_last one per
ResNet-50 shape, 1.2x summed (``benchmarks/NOTES.md``, CPU kernels 16).
:class:`~resnet_fast.models.FastResNet` enters the layout in the stem's max-pool
(:func:`max_pool_to_blocked`) and leaves it after ``layer4``; every residual unit in between runs
one of two kernels, each with the folded-BN bias, the residual add and ReLU applied as the output
is stored:

* :func:`winograd_unit` (3x3 stride 1 only): the Winograd kernel (``winograd_conv3x3_blocked``);
* :func:`direct_unit` (any supported shape): a direct convolution (``blocked_conv``).

Whether a model's residual stages run here or on channels_last tensors is decided by its
execution plan (``resnet_fast.models.plan``): measured, or forced by ``RESNET_FAST_CPU_BLOCKED=1|0``.
"""

from __future__ import annotations

from typing import Optional

import torch

from resnet_fast import _extension
from resnet_fast.ops.extension import _cached_packed_weight, _winograd_packed_weight
from resnet_fast.ops.folding import FoldedConv

CHANNEL_BLOCK = 8
MAX_KERNEL = 7  # blocked_conv's limit

_ops = torch.ops.resnet_fast  # kernels registered when resnet_fast.ops.extension loads resnet_fast._C


def available() -> bool:
    """Whether the loaded extension has the blocked kernels."""
    return _extension.extension() is not None and hasattr(_ops, "blocked_conv")


def to_blocked(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` in any memory format -> ``(N, C/8, H, W, 8)``, contiguous.

    Equivalent PyTorch: ``x.unflatten(1, (C // 8, 8)).permute(0, 1, 3, 4, 2).contiguous()``.
    """
    if x.dim() != 4 or x.shape[1] % CHANNEL_BLOCK:
        raise ValueError(f"to_blocked expects (N, C, H, W) with C a multiple of {CHANNEL_BLOCK}, "
                         f"got shape {tuple(x.shape)}")
    return x.unflatten(1, (x.shape[1] // CHANNEL_BLOCK, CHANNEL_BLOCK)).permute(0, 1, 3, 4, 2).contiguous()


def from_blocked(x: torch.Tensor) -> torch.Tensor:
    """``(N, C/8, H, W, 8)`` -> ``(N, C, H, W)``, channels_last.

    Equivalent PyTorch: ``x.permute(0, 2, 3, 1, 4).reshape(N, H, W, C).permute(0, 3, 1, 2)``.
    """
    if x.dim() != 5 or x.shape[4] != CHANNEL_BLOCK:
        raise ValueError(f"from_blocked expects (N, C/8, H, W, {CHANNEL_BLOCK}), got shape {tuple(x.shape)}")
    batch, blocks, height, width, _ = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(batch, height, width, blocks * CHANNEL_BLOCK).permute(0, 3, 1, 2)


def max_pool_to_blocked(x: torch.Tensor, pool: torch.nn.Module) -> torch.Tensor:
    """``to_blocked(pool(x))`` for a channels_last float32 ``x``, in one pass where ``pool`` is a
    square ``nn.MaxPool2d`` (no dilation, floor mode, no indices).

    Equivalent PyTorch: ``to_blocked(F.max_pool2d(x, kernel, stride, padding))``.
    """
    if _plain_square_max_pool(pool):
        return _ops.max_pool_to_blocked(x, _single(pool.kernel_size), _single(pool.stride), _single(pool.padding))
    return to_blocked(pool(x))


def _single(value) -> int:
    return value if isinstance(value, int) else value[0]


def _plain_square_max_pool(pool: torch.nn.Module) -> bool:
    if type(pool) is not torch.nn.MaxPool2d or pool.ceil_mode or pool.return_indices:
        return False
    pairs = [value if isinstance(value, tuple) else (value, value)
             for value in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)]
    return all(a == b for a, b in pairs) and pairs[3][0] == 1


def conv_supported(conv: torch.nn.Conv2d) -> bool:
    """Whether :func:`direct_unit` can run this convolution (groups 1, no dilation, square
    kernel up to 7x7, equal strides and zero paddings, channel counts in whole blocks)."""
    kernel_h, kernel_w = conv.kernel_size
    return (conv.groups == 1 and tuple(conv.dilation) == (1, 1) and kernel_h == kernel_w <= MAX_KERNEL
            and conv.stride[0] == conv.stride[1] and not isinstance(conv.padding, str)
            and conv.padding[0] == conv.padding[1] and conv.padding_mode == "zeros"
            and conv.in_channels % CHANNEL_BLOCK == 0 and conv.out_channels % CHANNEL_BLOCK == 0)


def winograd_shape(conv: torch.nn.Conv2d) -> bool:
    """Whether :func:`winograd_unit` can run this convolution (3x3, stride 1, padding 1, groups 1)."""
    return (tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


def winograd_unit(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """The Winograd kernel on blocked activations (3x3, stride 1, padding 1), on the channels_last
    unit's transformed weight (shared with it). Equivalent PyTorch::

        to_blocked(torch.relu(F.conv2d(from_blocked(x), w, b, padding=1) + from_blocked(residual)))
    """
    bias = folded.bias.detach().to(torch.float32)
    return _ops.winograd_conv3x3_blocked(x, _winograd_packed_weight(folded), bias, residual, relu)


def direct_unit(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor], relu: bool,
                overwrite_residual: bool = False) -> torch.Tensor:
    """The direct convolution on blocked activations (any :func:`conv_supported` shape), packed weights
    made once and cached in ``folded.packed``. With ``overwrite_residual`` the result may be stored in
    ``residual`` and returned (one output-sized buffer less to read from memory and write back); the
    caller must own ``residual``. Equivalent PyTorch::

        out = F.conv2d(from_blocked(x), folded.weight, folded.bias, stride, padding)
        to_blocked(torch.relu(out + from_blocked(residual)))
    """
    g = folded.geometry
    bias = folded.bias.detach().to(torch.float32)
    packed = _cached_packed_weight(folded, "blocked", lambda: _ops.blocked_conv_weight(folded.weight.detach()))
    if overwrite_residual and residual is not None and residual.is_contiguous():
        _ops.blocked_conv_add_(x, packed, bias, residual, relu, g.stride[0], g.padding[0])
        return residual
    return _ops.blocked_conv(x, packed, bias, residual, relu, g.stride[0], g.padding[0])
