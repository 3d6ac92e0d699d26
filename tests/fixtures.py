"""Model fixtures shared by the equivalence tests: non-trivial norm layers and buffer comparisons."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
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


class NetworkAccess(AssertionError):
    """Raised instead of downloading: every checkpoint a test needs is put in its TORCH_HOME first."""


def offline_torch_hub(monkeypatch: pytest.MonkeyPatch, torch_home: Path, why: str) -> Path:
    """Point torch.hub at ``torch_home`` (TORCH_HOME) and make any download raise :class:`NetworkAccess`
    (``why`` says what the test provides); returns the checkpoints folder torchvision's loader reads."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    assert torch.hub.get_dir() == str(torch_home / "hub"), (
        f"torch.hub.get_dir() is {torch.hub.get_dir()!r}, not under TORCH_HOME={torch_home}: torch.hub.set_dir "
        "was called, so the test checkpoints would not be found")

    def no_download(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        raise NetworkAccess(f"torch.hub tried to download {url} to {dst}: {why}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return torch_home / "hub" / "checkpoints"


def checkpoint_path(checkpoints: Path, weights: Any) -> Path:
    """Where torchvision's loader looks for ``weights`` (a torchvision weights enum member)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    return checkpoints / os.path.basename(weights.url)
