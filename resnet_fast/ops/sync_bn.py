"""Synchronised BatchNorm for the fused training unit: batch statistics over all processes.

``nn.SyncBatchNorm`` cannot be fused, so sync-BN is a mark (:data:`SYNC_BN_ATTR`, set by
``resnet_fast.train.distributed.enable_sync_bn``) on an ``nn.BatchNorm2d``'s ``__dict__``; in
training mode :func:`resnet_fast.nn.conv_bn_unit` then runs the vendor conv followed by
:func:`sync_bn_act_train`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from resnet_fast.ops import update_running_stats

#: The attribute (in a BatchNorm module's ``__dict__``, so the state_dict keeps torchvision's keys)
#: holding the process group whose batches a unit's statistics cover.
SYNC_BN_ATTR = "resnet_fast_process_group"


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
    return tensor


class _SyncBNAct(torch.autograd.Function):
    """``act(batch_norm(y) + residual)`` with batch statistics over all processes of ``group``."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], momentum: float, eps: float, relu: bool, group: Any
                ) -> torch.Tensor:
        channels = y.shape[1]
        local_count = y.numel() // channels
        # Sums in float64: sum(x^2)/n - mean^2 cancels badly in float32 over large global batches.
        dims = [d for d in range(y.dim()) if d != 1]
        sums = torch.empty(2 * channels + 1, dtype=torch.float64, device=y.device)
        sums[:channels] = y.sum(dim=dims, dtype=torch.float64)
        y_wide = y if y.dtype in (torch.float32, torch.float64) else y.float()  # squares of bf16 lose bits
        sums[channels:2 * channels] = (y_wide * y_wide).sum(dim=dims, dtype=torch.float64)
        sums[2 * channels] = local_count  # batches may differ in size between processes
        _all_reduce_sum(sums, group)
        count = sums[2 * channels]
        if float(count) <= 1:
            raise ValueError(f"training-mode BatchNorm needs more than 1 value per channel over all processes, "
                             f"got {int(count)}")
        mean64 = sums[:channels] / count
        var64 = (sums[channels:2 * channels] / count - mean64.square()).clamp_min(0)
        mean, var = mean64.float(), var64.float()
        invstd = torch.rsqrt(var + eps)

        update_running_stats(running_mean, running_var, mean64, var64, count, momentum)

        shape = [1, channels] + [1] * (y.dim() - 2)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean * scale if bias is None else bias.float() - mean * scale
        out = y.float() * scale.view(shape) + shift.view(shape)
        if residual is not None:
            out = out + residual.float()
        if relu:
            out = torch.relu(out)
        out = out.to(y.dtype)
        ctx.save_for_backward(y, mean, invstd, weight, out if relu else None)
        ctx.group, ctx.relu, ctx.has_residual = group, relu, residual is not None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        y, mean, invstd, weight, out = ctx.saved_tensors
        channels = y.shape[1]
        shape = [1, channels] + [1] * (y.dim() - 2)
        dims = [d for d in range(y.dim()) if d != 1]
        grad = grad_out.float()
        if ctx.relu:
            grad = grad * (out > 0)
        grad_residual = grad.to(ctx.residual_dtype) if ctx.has_residual else None
        xhat = (y.float() - mean.view(shape)) * invstd.view(shape)
        # Local reductions give the affine parameters' gradients (DDP averages them across processes,
        # as with nn.SyncBatchNorm); the input gradient needs them summed over every process.
        sum_grad = grad.sum(dim=dims)
        sum_grad_xhat = (grad * xhat).sum(dim=dims)
        needs_input_grad = ctx.needs_input_grad[0]
        grad_y = None
        if needs_input_grad:
            local_count = y.numel() // channels
            packed = torch.cat([sum_grad, sum_grad_xhat, sum_grad.new_tensor([float(local_count)])])
            _all_reduce_sum(packed, ctx.group)
            count = packed[2 * channels]
            mean_grad = (packed[:channels] / count).view(shape)
            mean_grad_xhat = (packed[channels:2 * channels] / count).view(shape)
            scale = invstd if weight is None else invstd * weight.float()
            grad_y = ((grad - mean_grad - xhat * mean_grad_xhat) * scale.view(shape)).to(y.dtype)
        grad_weight = sum_grad_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_grad.to(weight.dtype if weight is not None else y.dtype) \
            if ctx.needs_input_grad[2] else None
        return grad_y, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None


def sync_bn_act_train(y: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], momentum: float,
                      eps: float, residual: Optional[torch.Tensor], relu: bool, group: Any) -> torch.Tensor:
    """Training-mode BatchNorm of conv output ``y`` with statistics over all processes of ``group``,
    ``+ residual``, ReLU; the running statistics (when given) are updated from the global statistics
    (unbiased variance with the global count), as ``nn.SyncBatchNorm`` does.

    Equivalent PyTorch (with ``sync_bn`` an ``nn.SyncBatchNorm`` holding these parameters and statistics)::

        out = torch.relu(sync_bn(y) + residual)
    """
    return _SyncBNAct.apply(y, weight, bias, residual, running_mean, running_var, momentum, eps, relu, group)
