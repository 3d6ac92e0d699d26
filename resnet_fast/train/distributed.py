"""Multi-process data-parallel training: process-group setup and synchronised BatchNorm on the fused path.

``nn.SyncBatchNorm`` cannot be fused (the fused unit rejects it), so sync-BN is a
mark on each ``nn.BatchNorm2d`` (:func:`enable_sync_bn`) that
:func:`resnet_fast.nn.fused.conv_bn_unit` checks in training mode; the marked
unit then runs the vendor conv followed by :func:`resnet_fast.ops.sync_bn.sync_bn_act_train`, which has
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

from resnet_fast.ops.sync_bn import SYNC_BN_ATTR

__all__ = ["DistributedContext", "init_from_env", "enable_sync_bn", "disable_sync_bn", "sum_across", "SYNC_BN_ATTR"]


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


def sum_across(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """``values`` summed over all processes (metrics: counts, loss sums); unchanged in a single process."""
    if context.enabled:
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values
