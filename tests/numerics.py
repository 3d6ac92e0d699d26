"""The tolerance rule of the project, shared by every equivalence test.

A fused result passes when its error against the float64 reference is at most
twice the error of the stock PyTorch path in the same dtype, plus a tiny
absolute floor, measured both as max-abs error and as ``||out - ref|| / ||ref||``.
NaN never passes.

The rule itself lives in :mod:`resnet_fast.numerics` (the bench reports the same
errors); this module turns it into assertions and adds the test-only output poisoning.
"""

from __future__ import annotations

from typing import Optional

import torch

from resnet_fast.numerics import errors, tolerance_failure

__all__ = ["POISON", "errors", "assert_tolerance", "poisoned_like", "poison_allocator"]

POISON = float("nan")


def assert_tolerance(
    out: torch.Tensor,
    ref64: torch.Tensor,
    stock: torch.Tensor,
    name: str = "output",
    factor: float = 2.0,
    floor: Optional[float] = None,
) -> None:
    """Assert ``out`` is within ``factor`` x the stock path's error against ``ref64`` (+ floor)."""
    failure = tolerance_failure(out, ref64, stock, name=name, factor=factor, floor=floor)
    if failure is not None:
        raise AssertionError(failure)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` filled with NaN (or the max value for integer dtypes)."""
    out = torch.empty_like(t)
    return out.fill_(POISON if t.is_floating_point() else torch.iinfo(t.dtype).max)


def poison_allocator(like: torch.Tensor, copies: int = 4) -> None:
    """Best effort for ops that allocate their own output: free NaN-filled blocks of the output's
    size, which the allocator tends to hand back, so an element the kernel never writes shows as NaN."""
    blocks = [poisoned_like(like) for _ in range(copies)]
    del blocks
