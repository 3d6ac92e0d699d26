"""Per-channel batch statistics (mean, biased variance) of an (N, C, H, W) tensor.

Two stages, both deterministic (no atomics):

1. partial statistics: each program reduces a slice of the N*H*W rows of some
   channels to ``(count, sum, M2)`` (M2 = sum of squared deviations from the
   slice mean). The conv kernel's epilogue writes the same partial format, so
   a training conv needs no extra pass over its output.
2. finalize: merges the partials per channel with Chan et al.'s parallel
   formula, which stays accurate where ``E[y^2] - E[y]^2`` would cancel.

The stand-alone pass also shifts every channel by its first value (``y[0, c, 0, 0]``)
before summing (the shifted-data algorithm): with a mean far from zero the
partial sums then stay small and lose no digits. The conv epilogue cannot see
another program's first value, so its partials are unshifted.

NaN and Inf come out as a plain ``sum / count`` would give them (``F.batch_norm``'s
CPU statistics): the mean is NaN for a channel holding NaN or both infinities, else
+-Inf for one holding an infinity; the variance is NaN for either. Two helpers keep
it so wherever the values sit: :func:`finite_or_zero` (a non-finite first value is no
shift) and :func:`chan_merge` (Chan's ``mean + delta * n_b / n`` turns ``Inf - Inf``
into NaN, and ``delta**2 * 0`` into NaN when ``delta**2`` overflows).

Reference -> kernels -> host functions -> op -> public function.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from resnet_fast.ops.triton import _common


def batch_stats_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Equivalent PyTorch: per-channel mean and biased variance over (N, H, W), in float32 (or better)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), correction=0)
    return mean, var


#: Largest finite float32: ``|x| <= FLOAT32_MAX`` is false exactly for NaN and +-Inf.
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def finite_or_zero(x):
    """``x`` where finite, else 0 (for the shift: ``y - Inf`` would be NaN for every finite ``y``)."""
    return tl.where(tl.abs(x) <= FLOAT32_MAX, x, 0.0)


@triton.jit
def chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2):
    """Chan et al.'s merge of ``(count, mean, M2)`` with a tile's; either count may be 0.

    Finite means merge as ``mean + delta * n_b / n`` (accurate where the means are close).
    A NaN or infinite mean merges as a sum would (``Inf + finite = Inf``, ``Inf + -Inf = NaN``):
    the delta form would give ``Inf - Inf = NaN`` for two infinities of one sign, or an Inf mean
    followed by a finite tile. The cross term is skipped when a side is empty, so a finite but huge
    ``delta`` (``delta**2`` overflows) is not multiplied by 0 into NaN."""
    merged = count + tile_count
    delta = tile_mean - mean
    finite = (tl.abs(mean) <= FLOAT32_MAX) & (tl.abs(tile_mean) <= FLOAT32_MAX)
    mean = tl.where(finite, mean + delta * (tile_count / tl.maximum(merged, 1.0)), mean + tile_mean)
    weight = count * tile_count / tl.maximum(merged, 1.0)
    m2 = m2 + tile_m2 + tl.where(weight == 0.0, 0.0, delta * delta * weight)
    return merged, mean, m2


@triton.jit
def partial_stats_kernel(
    y_ptr,
    sum_ptr,
    m2_ptr,
    count_ptr,
    batch,
    channels,
    pixels,
    rows_per_program,
    stride_yn,
    stride_yp,
    stride_yc,
    stride_sm,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (s, c): rows [s * rows_per_program, (s + 1) * rows_per_program) of channels block c."""
    pid_split = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    total_rows = batch * pixels
    shift = finite_or_zero(tl.load(y_ptr + offs_c * stride_yc, mask=mask_c, other=0.0).to(tl.float32))
    row_start = pid_split * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, total_rows)

    count = 0.0
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile_start in range(row_start, row_end, BLOCK_M):
        offs_m = tile_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        image = (offs_m // pixels).to(tl.int64)  # image * stride_n may pass 2**31
        pixel = offs_m % pixels
        pointers = y_ptr + image[:, None] * stride_yn + pixel[:, None] * stride_yp + offs_c[None, :] * stride_yc
        valid = mask_m[:, None] & mask_c[None, :]
        tile = tl.where(valid, tl.load(pointers, mask=valid, other=0.0).to(tl.float32) - shift[None, :], 0.0)
        tile_count = tl.sum(mask_m.to(tl.float32), axis=0)
        tile_mean = tl.sum(tile, axis=0) / tile_count
        deviation = tl.where(valid, tile - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        count, mean, m2 = chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)

    tl.store(sum_ptr + pid_split * stride_sm + offs_c, mean * count, mask=mask_c)
    tl.store(m2_ptr + pid_split * stride_sm + offs_c, m2, mask=mask_c)
    # Every channel block writes the same count: a benign duplicate store.
    tl.store(count_ptr + pid_split, count)


@triton.jit
def finalize_stats_kernel(
    sum_ptr,
    m2_ptr,
    count_ptr,
    shift_ptr,
    mean_ptr,
    var_ptr,
    rows,
    channels,
    stride_sm,
    stride_shift,
    HAS_SHIFT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge ``rows`` partials per channel; rows with count 0 (never written) are skipped.
    With ``HAS_SHIFT`` the partials are of ``y - shift`` and the shift is added back to the mean."""
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels

    count = 0.0
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for row_start in range(0, rows, BLOCK_R):
        offs_r = row_start + tl.arange(0, BLOCK_R)
        row_counts = tl.load(count_ptr + offs_r, mask=offs_r < rows, other=0.0)
        written = row_counts > 0
        valid = written[:, None] & mask_c[None, :]
        offsets = offs_r[:, None] * stride_sm + offs_c[None, :]
        # Unwritten rows hold garbage (the buffers are torch.empty): never touch their values.
        row_sums = tl.where(valid, tl.load(sum_ptr + offsets, mask=valid, other=0.0), 0.0)
        row_m2s = tl.where(valid, tl.load(m2_ptr + offsets, mask=valid, other=0.0), 0.0)
        tile_count = tl.sum(row_counts, axis=0)
        tile_mean = tl.sum(row_sums, axis=0) / tl.maximum(tile_count, 1.0)
        row_means = row_sums / tl.maximum(row_counts, 1.0)[:, None]
        spread = tl.where(valid, row_means - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(row_m2s, axis=0) + tl.sum(row_counts[:, None] * spread * spread, axis=0)
        count, mean, m2 = chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)

    if HAS_SHIFT:
        # The same shift the partial kernel subtracted (0 where y's first value is not finite).
        mean += finite_or_zero(tl.load(shift_ptr + offs_c * stride_shift, mask=mask_c, other=0.0).to(tl.float32))
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, m2 / tl.maximum(count, 1.0), mask=mask_c)


class PartialStats:
    """Buffers of per-slice ``(sum, M2)`` per channel and ``count`` per slice, filled by a kernel."""

    def __init__(self, rows: int, channels: int, device: torch.device) -> None:
        self.sums = torch.empty((rows, channels), dtype=torch.float32, device=device)
        self.m2s = torch.empty((rows, channels), dtype=torch.float32, device=device)
        # Zeroed: rows a kernel does not write (autotuned block sizes vary) must count as empty.
        self.counts = torch.zeros((rows,), dtype=torch.float32, device=device)
        self.rows = rows
        self.channels = channels


def finalize_stats(partial: PartialStats, shift: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) in float32 from the partials (of ``y - shift[c]`` when ``shift`` is given)."""
    device = partial.sums.device
    mean = _common.empty_output((partial.channels,), torch.float32, device)
    var = _common.empty_output((partial.channels,), torch.float32, device)
    block_c = _common.interpreter_channels(partial.channels) if _common.interpreted() else 64
    block_r = _common.interpreter_block(partial.rows) if _common.interpreted() else 64
    grid = (triton.cdiv(partial.channels, block_c),)
    _common.launcher(finalize_stats_kernel)[grid](
        partial.sums,
        partial.m2s,
        partial.counts,
        shift,
        mean,
        var,
        partial.rows,
        partial.channels,
        partial.sums.stride(0),
        shift.stride(0) if shift is not None else 0,
        HAS_SHIFT=shift is not None,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return mean, var


def _split_rows(total_rows: int, channel_blocks: int, block_m: int) -> int:
    """Rows per program: enough programs to fill a GPU (~1024), few enough partials to finalize fast."""
    target_programs = 8 if _common.interpreted() else 1024
    splits = max(1, min(triton.cdiv(total_rows, block_m), triton.cdiv(target_programs, channel_blocks)))
    return triton.cdiv(triton.cdiv(total_rows, splits), block_m) * block_m


def batch_stats_host(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Host function: partial statistics kernel, then finalize."""
    y, (stride_yn, stride_yp, stride_yc) = _common.flat_pixel_view(y)
    batch, channels, height, width = y.shape
    pixels = height * width
    total_rows = batch * pixels
    _common.check_rows(total_rows)
    if channels == 0 or total_rows == 0:  # no programs to spread; statistics of nothing are NaN, as in torch
        nothing = y.new_full((channels,), float("nan"), dtype=torch.float32)
        return nothing, nothing.clone()
    if _common.interpreted():
        block_m, block_c = _common.interpreter_block(total_rows), _common.interpreter_channels(channels)
    else:
        block_m, block_c = 64, 32
    channel_blocks = triton.cdiv(channels, block_c)
    rows_per_program = _split_rows(total_rows, channel_blocks, block_m)
    splits = triton.cdiv(total_rows, rows_per_program)
    partial = PartialStats(splits, channels, y.device)
    _common.launcher(partial_stats_kernel)[(splits, channel_blocks)](
        y,
        partial.sums,
        partial.m2s,
        partial.counts,
        batch,
        channels,
        pixels,
        rows_per_program,
        stride_yn,
        stride_yp,
        stride_yc,
        partial.sums.stride(0),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
    )
    # The shift the partial kernel used: each channel's first value (a strided view, no copy).
    return finalize_stats(partial, shift=y[0, :, 0, 0])


def _batch_stats_fake(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    stats = y.new_empty((y.shape[1],), dtype=torch.float32)
    return stats, torch.empty_like(stats)


@_common.define_op("triton_batch_stats", fake=_batch_stats_fake)
def batch_stats_op(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batch_stats_host(y)


def batch_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of ``y`` in float32; not differentiable.

    Equivalent PyTorch::

        var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    """
    return batch_stats_op(y.detach())
