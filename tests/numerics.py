"""The tolerance rule of the project, shared by every equivalence test.

A fused result passes when its error against the float64 reference is at most
twice the error of the stock PyTorch path in the same dtype, plus a tiny
absolute floor, measured both as max-abs error and as ``||out - ref|| / ||ref||``.
NaN never passes.
"""

from __future__ import annotations

from typing import Optional

import torch

POISON = float("nan")
_FLOORS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative L2 error) of ``out`` against ``ref``, computed in float64."""
    diff = out.detach().double().cpu() - ref.detach().double().cpu()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    norm = ref.detach().double().cpu().norm().item()
    rel = diff.norm().item() / norm if norm > 0 else diff.norm().item()
    return max_abs, rel


def assert_tolerance(
    out: torch.Tensor,
    ref64: torch.Tensor,
    stock: torch.Tensor,
    name: str = "output",
    factor: float = 2.0,
    floor: Optional[float] = None,
) -> None:
    """Assert ``out`` is within ``factor`` x the stock path's error against ``ref64`` (+ floor)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref64.shape)}"
    nan = torch.isnan(out.detach())
    if nan.any():
        where = nan.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(nan.sum())} NaN values (first at index {where}); "
                             "an unwritten (poisoned) output or an overflow")
    floor = _FLOORS.get(out.dtype, 1e-6) if floor is None else floor
    out_abs, out_rel = errors(out, ref64)
    stock_abs, stock_rel = errors(stock, ref64)
    scale = max(ref64.detach().abs().max().item(), 1.0) if ref64.numel() else 1.0
    abs_limit = factor * stock_abs + floor * scale
    rel_limit = factor * stock_rel + floor
    if out_abs > abs_limit or out_rel > rel_limit:
        diff = (out.detach().double().cpu() - ref64.detach().double().cpu()).abs()
        worst = list(torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else []
        worst = [int(i) for i in worst]
        raise AssertionError(
            f"{name} ({out.dtype}): max abs error {out_abs:.3e} (limit {abs_limit:.3e}), relative error "
            f"{out_rel:.3e} (limit {rel_limit:.3e}); stock path errors {stock_abs:.3e} / {stock_rel:.3e}; "
            f"worst element at index {worst}: got {out.detach().flatten()[diff.argmax()].item():.6g}, "
            f"reference {ref64.detach().flatten()[diff.argmax()].item():.6g}")


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` filled with NaN (or the max value for integer dtypes)."""
    out = torch.empty_like(t)
    return out.fill_(POISON if t.is_floating_point() else torch.iinfo(t.dtype).max)


def poison_allocator(like: torch.Tensor, copies: int = 4) -> None:
    """Best effort for ops that allocate their own output: free NaN-filled blocks of the output's
    size, which the allocator tends to hand back, so an element the kernel never writes shows as NaN."""
    blocks = [poisoned_like(like) for _ in range(copies)]
    del blocks
