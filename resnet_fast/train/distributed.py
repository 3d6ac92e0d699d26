"""Multi-process data-parallel training: process-group setup and synchronised BatchNorm on the fused path.

``nn.SyncBatchNorm`` cannot be fused (the fused unit rejects it), so sync-BN is a
mark on each ``nn.BatchNorm2d`` (:func:`enable_sync_bn`) that
:func:`resnet_fast.nn.fused.conv_bn_unit` checks in training mode; the marked
unit then runs the vendor conv followed by :func:`sync_bn_act_train`, which has
the semantics of ``nn.SyncBatchNorm``: mean and variance over the batches of all
processes, running statistics updated from those global statistics, and the
input gradient's reductions all-reduced in backward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from resnet_fast.ops import update_running_stats

__all__ = ["DistributedContext", "init_from_env", "enable_sync_bn", "disable_sync_bn", "sync_bn_act_train", "sum_across",
           "SYNC_BN_ATTR"]

SYNC_BN_ATTR = "resnet_fast_process_group"


@dataclass
class DistributedContext:
    """Where this process sits in a ``torchrun`` job (world_size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def shutdown(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.initialized_here = False


def init_from_env(device_type: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not torch.distributed.is_available():
        raise RuntimeError("this torch build has no torch.distributed; cannot run under torchrun")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.distributed.is_initialized():
        return DistributedContext(rank, world_size, local_rank, initialized_here=False)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend=backend)
    return DistributedContext(rank, world_size, local_rank, initialized_here=True)


def enable_sync_bn(model: nn.Module, process_group: Optional[Any] = None) -> int:
    """Mark every ``nn.BatchNorm2d`` of ``model`` to reduce its batch statistics over ``process_group``.

    ``process_group=None`` means the default (world) group. Needs an initialised
    ``torch.distributed``. Returns the number of BatchNorm layers marked. Module
    names, parameters and state_dict keys do not change (unlike ``convert_sync_batchnorm``).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("enable_sync_bn needs an initialised torch.distributed process group "
                           "(run under torchrun or call torch.distributed.init_process_group first)")
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    marked = 0
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, nn.SyncBatchNorm):
            # Stored in __dict__ (not a parameter/buffer): the state_dict keeps torchvision's keys.
            module.__dict__[SYNC_BN_ATTR] = group
            marked += 1
    return marked


def disable_sync_bn(model: nn.Module) -> None:
    """Remove the marks of :func:`enable_sync_bn` (e.g. before pickling the model)."""
    for module in model.modules():
        module.__dict__.pop(SYNC_BN_ATTR, None)


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


def sync_bn_act_train(y: torch.Tensor, bn: nn.BatchNorm2d, residual: Optional[torch.Tensor], relu: bool,
                      group: Any) -> torch.Tensor:
    """Training-mode BatchNorm of conv output ``y`` with statistics over all processes, ``+ residual``, ReLU.

    Updates ``bn``'s running statistics (unbiased variance with the global count) and
    ``num_batches_tracked`` exactly as ``nn.SyncBatchNorm`` does.

    Equivalent PyTorch (with ``sync_bn`` an ``nn.SyncBatchNorm`` holding ``bn``'s state)::

        out = torch.relu(sync_bn(y) + residual)
    """
    from resnet_fast.ops import momentum_factor

    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    factor = momentum_factor(bn.momentum, bn.num_batches_tracked) if update else 0.0
    running = (bn.running_mean, bn.running_var) if update else (None, None)
    return _SyncBNAct.apply(y, bn.weight, bn.bias, residual, *running, factor, bn.eps, relu, group)


def sum_across(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """``values`` summed over all processes (metrics: counts, loss sums); unchanged in a single process."""
    if context.enabled:
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values
