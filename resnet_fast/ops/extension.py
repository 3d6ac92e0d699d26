"""The ``extension`` backend: the compiled kernels of ``resnet_fast._C`` (CPU and CUDA).

The C++/CUDA side implements three primitive ops (schemas in ``_library.py``);
this module composes them into the two units every backend provides and
registers the training unit's autograd, whose backward is one fused kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from resnet_fast.ops import _library  # noqa: F401  (schemas)
from resnet_fast.ops.folding import FoldedConv
from resnet_fast.ops.reference import conv2d

_ops = torch.ops.resnet_fast


def conv_bias_act(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """Inference unit: vendor conv without bias, then one fused pass for bias + residual + ReLU.

    Equivalent PyTorch: ``relu(conv2d(x, folded.weight, folded.bias) + residual)``.
    """
    y = conv2d(x, folded.weight, None, folded.geometry)
    return _ops.bn_act_forward(y, None, folded.bias.float(), residual, relu)


@torch.library.custom_op("resnet_fast::bn_act_train", mutates_args=())
def _bn_act_train(
    y: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, batch_mean, batch_var_biased)`` of ``act(batch_norm(y) + residual)``."""
    mean, var = _ops.batch_stats(y)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.float() * invstd
    shift = -mean * scale if bias is None else bias.float() - mean * scale
    out = _ops.bn_act_forward(y, scale, shift, residual, relu)
    return out, mean, var


@_bn_act_train.register_fake
def _(y, weight, bias, residual, eps, relu):
    stats = y.new_empty((y.shape[1],), dtype=torch.float32)
    return torch.empty_like(y), stats, torch.empty_like(stats)


def _setup_context(ctx, inputs, output):
    y, weight, bias, residual, eps, relu = inputs
    out, mean, var = output
    ctx.save_for_backward(y, out, mean, var, weight)
    ctx.eps = eps
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    y, out, mean, var, weight = ctx.saved_tensors
    invstd = torch.rsqrt(var + ctx.eps)
    need_residual = ctx.has_residual and ctx.needs_input_grad[3]
    grad_y, grad_weight, grad_bias, grad_residual = _ops.bn_act_backward(
        grad_out.contiguous(memory_format=_memory_format(y)), out, y, mean, invstd,
        None if weight is None else weight.float(), ctx.relu, need_residual)
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (
        grad_y,
        None if weight_dtype is None else grad_weight.to(weight_dtype),
        None if bias_dtype is None else grad_bias.to(bias_dtype),
        grad_residual if need_residual else None,
        None,
        None,
    )


_bn_act_train.register_autograd(_backward, setup_context=_setup_context)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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
    """Training unit: ``act(batch_norm(y) + residual)`` with the running-stat update, as ``nn.BatchNorm2d``."""
    out, mean, var = _bn_act_train(y, weight, bias, residual, eps, relu)
    update_running_stats(running_mean, running_var, mean, var, y.numel() // y.shape[1], momentum)
    return out
