"""Errors against a float64 reference, and the project's tolerance rule.

A fused result passes when its error against the float64 reference is at most
twice the error of the stock PyTorch path in the same dtype, plus a tiny
absolute floor, measured both as max-abs error and as ``||out - ref|| / ||ref||``.
NaN never passes.

Used by the equivalence tests (``tests/numerics.py`` wraps :func:`tolerance_failure`
in an assertion) and by ``resnet-fast bench`` (:func:`errors` of every provider
against torchvision eager).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["FLOORS", "errors", "first_nan", "tolerance_limits", "tolerance_failure"]

# Absolute floor of the tolerance rule per dtype (scaled by max |ref| for the max-abs error): results that
# round to the reference in the last bits pass even when the stock path happens to be exact.
FLOORS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
_DEFAULT_FLOOR = 1e-6

_INF = float("inf")


def errors(out: Tensor, ref: Tensor) -> tuple[float, float]:
    """``(max |out - ref|, ||out - ref|| / ||ref||)`` of ``out`` against ``ref``, computed in float64 on the CPU.

    A NaN or infinity in ``out`` gives ``(inf, inf)``, so a non-finite result fails every tolerance (a NaN error
    would compare false against any limit and pass). A non-finite ``ref`` makes the errors ``inf`` too. An all-zero
    ``ref`` gives the absolute L2 error as the relative one; empty tensors have zero error.

    Raises:
        ValueError: when the shapes differ.
    """
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if out64.shape != ref64.shape:
        raise ValueError(f"output shape {tuple(out64.shape)} differs from the reference {tuple(ref64.shape)}")
    if out64.numel() == 0:
        return 0.0, 0.0
    if not torch.isfinite(out64).all():
        return _INF, _INF
    diff = out64 - ref64
    max_abs = diff.abs().max().item()
    norm = ref64.norm().item()
    rel = diff.norm().item() / norm if norm > 0 else diff.norm().item()
    # A non-finite reference gives NaN here (inf - inf, inf / inf): report it as the worst error, never a pass.
    return (_INF if max_abs != max_abs else max_abs), (_INF if rel != rel else rel)


def first_nan(out: Tensor) -> Optional[tuple[int, list[int]]]:
    """``(number of NaN values, index of the first)`` in ``out``, or None when it has none."""
    nan = torch.isnan(out.detach())
    if not nan.any():
        return None
    return int(nan.sum()), nan.nonzero()[0].tolist()


def tolerance_limits(ref64: Tensor, stock_errors: tuple[float, float], dtype: torch.dtype, factor: float = 2.0,
                     floor: Optional[float] = None) -> tuple[float, float]:
    """``(max-abs limit, relative limit)`` of the rule: ``factor`` x the stock path's errors plus the dtype's floor.

    The max-abs floor scales with ``max(max |ref64|, 1)``; ``floor`` overrides :data:`FLOORS`.
    """
    floor = FLOORS.get(dtype, _DEFAULT_FLOOR) if floor is None else floor
    scale = max(ref64.detach().abs().max().item(), 1.0) if ref64.numel() else 1.0
    stock_abs, stock_rel = stock_errors
    return factor * stock_abs + floor * scale, factor * stock_rel + floor


def tolerance_failure(out: Tensor, ref64: Tensor, stock: Tensor, name: str = "output", factor: float = 2.0,
                      floor: Optional[float] = None) -> Optional[str]:
    """Why ``out`` fails the tolerance rule against ``ref64`` (with ``stock`` as the stock path), or None if it passes.

    The message names the shape mismatch, the NaN count and first NaN index, or the errors, their limits and the
    worst element.
    """
    if out.shape != ref64.shape:
        return f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref64.shape)}"
    nan = first_nan(out)
    if nan is not None:
        return (f"{name}: {nan[0]} NaN values (first at index {nan[1]}); "
                "an unwritten (poisoned) output or an overflow")
    out_abs, out_rel = errors(out, ref64)
    stock_abs, stock_rel = errors(stock, ref64)
    abs_limit, rel_limit = tolerance_limits(ref64, (stock_abs, stock_rel), out.dtype, factor, floor)
    if out_abs <= abs_limit and out_rel <= rel_limit:
        return None
    diff = (out.detach().double().cpu() - ref64.detach().double().cpu()).abs()
    worst = [int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)] if diff.numel() else []
    return (f"{name} ({out.dtype}): max abs error {out_abs:.3e} (limit {abs_limit:.3e}), relative error "
            f"{out_rel:.3e} (limit {rel_limit:.3e}); stock path errors {stock_abs:.3e} / {stock_rel:.3e}; "
            f"worst element at index {worst}: got {out.detach().flatten()[diff.argmax()].item():.6g}, "
            f"reference {ref64.detach().flatten()[diff.argmax()].item():.6g}")
