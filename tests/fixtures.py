"""Model fixtures shared by the equivalence tests: non-trivial norm layers and buffer comparisons."""

from __future__ import annotations

import torch
from torch import nn

from tests.numerics import assert_tolerance


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (so a wrong fold cannot hide behind
    gamma=1, mean=0); torchvision's FrozenBatchNorm2d, which holds them as buffers, likewise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
                n = m.running_mean.numel()
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def assert_buffers_match(fast: nn.Module, stock: nn.Module, stock64: nn.Module, what: str) -> None:
    """Running statistics by the tolerance rule (against the float64 twin), batch counts exactly."""
    for (name, mine), theirs, theirs64 in zip(fast.named_buffers(), stock.buffers(), stock64.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(mine, theirs), f"{what} {name}: {mine} != torchvision's {theirs}"
        else:
            assert_tolerance(mine, theirs64, theirs, f"{what} {name}")
