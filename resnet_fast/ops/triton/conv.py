"""Implicit-GEMM 2-d convolution with a fused bias + residual + ReLU epilogue (NHWC).

As a GEMM per group: ``M = N * OH * OW`` output pixels, ``N = C_out / groups``
output channels, ``K = KH * KW * C_in / groups``, walked tap by tap
(``r, s``) and, within a tap, in ``BLOCK_K`` chunks of contiguous input
channels, so each A-tile load is a dense NHWC channel run. The weight is
pre-packed once per fold to ``(groups, KH, KW, C_in/groups, C_out/groups)``
(K-major rows, output channels contiguous): the B tile of the tutorial's
``(K, N)`` matmul.

The epilogue adds the folded-BN bias, then (training) writes per-block
partial statistics of the biased conv output for :mod:`bn_stats`, then adds
the residual and applies the activation. Outputs are channels_last.

Reference -> kernel -> host function -> ops -> public function.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from resnet_fast import settings
from resnet_fast.ops.triton import _common
from resnet_fast.ops.triton._rounding import round_to_bf16_grid
from resnet_fast.ops.triton.bn_act import relu_keep_nan
from resnet_fast.ops.triton.bn_stats import PartialStats, finalize_stats


def conv_bias_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    relu: bool,
) -> torch.Tensor:
    """Equivalent PyTorch: ``relu(conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)``."""
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out



# GPU configurations, one family per dot precision, each sized for sm_90 (H200: 227 KiB shared memory
# per block, 255 registers per thread) so no tile spills (benchmarks/triton_sm90_check.py checks it).
# 4-warp tiles take BLOCK_K 32: at 64 they spill (the A and B tiles' per-element 64-bit pointers live
# in registers too); only 8-warp tiles keep BLOCK_K 64.
# bf16 / fp16 on tensor cores (BLOCK_K 64 = one 128-byte row of channels); the last one, BLOCK_K 16,
# is the stem's (3 input channels).
HALF_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=5, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=5, num_warps=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
# fp32 with TF32 (tensor cores), PyTorch's default for cuDNN convolutions, which the host follows:
# operands twice as wide as bf16's, so half the BLOCK_K.
TF32_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
# fp32 with TF32 off (torch.backends.cudnn.allow_tf32 = False, as in the tests): an FMA dot whose
# operand slices live in registers, so BLOCK_K 16 and at most 64 accumulators per thread.
IEEE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=2, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=4, num_warps=4),
]


def _tile(config):
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


# The autotuner's list: every family, each tile once (a tile in two families is timed once).
GPU_CONFIGS = list({_tile(c): c for c in HALF_CONFIGS + TF32_CONFIGS + IEEE_CONFIGS}.values())


def config_family(named_args, kwargs):
    """The configs for this launch's dot: by the input dtype and ``DOT_IEEE`` (absent when called from
    :func:`untuned_config`, which then reads the same TF32 setting the host does)."""
    if named_args["x_ptr"].dtype != torch.float32:
        return HALF_CONFIGS
    dot_ieee = kwargs.get("DOT_IEEE")
    if dot_ieee is None:
        dot_ieee = not _common.conv_allows_tf32()
    return IEEE_CONFIGS if dot_ieee else TF32_CONFIGS


def prune_configs(configs, named_args, **kwargs):
    """The dot's family in its own order (untuned_config runs the first), matched by tile rather than
    identity in case a caller copied the configs, less tiles far wider than the layer (wasted MMA work),
    keeping at least one config."""
    by_tile = {_tile(c): c for c in configs}
    candidates = [by_tile[_tile(c)] for c in config_family(named_args, kwargs) if _tile(c) in by_tile]
    candidates = candidates or list(configs)
    channels_in = named_args["in_channels_per_group"]
    channels_out = named_args["out_channels_per_group"]
    kept = [c for c in candidates
            if c.kwargs["BLOCK_K"] <= max(16, triton.next_power_of_2(channels_in))
            and c.kwargs["BLOCK_N"] <= max(32, 2 * triton.next_power_of_2(channels_out))]
    return kept or candidates[-1:]


#: Smallest BLOCK_M of any tile (GPU or interpreter): sizes the partial-statistics buffers.
MIN_BLOCK_M = 16


@triton.jit
def conv2d_nhwc_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    residual_ptr,
    out_ptr,
    stats_sum_ptr,
    stats_m2_ptr,
    stats_count_ptr,
    batch,
    in_height,
    in_width,
    in_channels_per_group,
    out_height,
    out_width,
    out_channels_per_group,
    kernel_h,
    kernel_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_wg,
    stride_wk,
    stride_wn,
    stride_rn,
    stride_rh,
    stride_rw,
    stride_rc,
    stride_on,
    stride_oh,
    stride_ow,
    stride_oc,
    stride_sm,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    EMIT_STATS: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Program (p, g): one (BLOCK_M pixels x BLOCK_N channels) tile of conv group g."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    out_pixels = out_height * out_width
    total_m = batch * out_pixels
    num_pid_m = tl.cdiv(total_m, BLOCK_M)
    num_pid_n = tl.cdiv(out_channels_per_group, BLOCK_N)
    # Grouped ordering (matmul tutorial): GROUP_M row-blocks share each weight column-block in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < total_m
    mask_n = offs_n < out_channels_per_group
    # Image offsets in int64: image * stride_xn passes 2**31 elements on large batches (pixels and
    # channels within one image stay int32, as does offs_m: the host checks total_m fits).
    image = (offs_m // out_pixels).to(tl.int64)
    pixel = offs_m % out_pixels
    out_row = pixel // out_width
    out_col = pixel % out_width
    in_row0 = out_row * stride_h - pad_h
    in_col0 = out_col * stride_w - pad_w

    x_image = x_ptr + image * stride_xn + group * in_channels_per_group * stride_xc
    # B tile pointers for channel chunk 0 of tap 0; each tap starts in_channels_per_group rows further.
    w_tap = w_ptr + group * stride_wg + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, kernel_h):
        in_row = in_row0 + r * dilation_h
        row_ok = mask_m & (in_row >= 0) & (in_row < in_height)
        x_row = x_image + in_row * stride_xh
        for s in range(0, kernel_w):
            in_col = in_col0 + s * dilation_w
            pixel_ok = (row_ok & (in_col >= 0) & (in_col < in_width))[:, None]
            a_ptrs = (x_row + in_col * stride_xw)[:, None] + offs_k[None, :] * stride_xc
            b_ptrs = w_tap
            for c0 in range(0, in_channels_per_group, BLOCK_K):
                # Pointer increments, as in the matmul tutorial: channels left in this tap mask the K edge.
                channel_ok = offs_k < in_channels_per_group - c0
                a = tl.load(a_ptrs, mask=pixel_ok & channel_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=channel_ok[:, None] & mask_n[None, :], other=0.0)
                if DOT_UPCAST:
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                elif DOT_IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
                a_ptrs += BLOCK_K * stride_xc
                b_ptrs += BLOCK_K * stride_wk
            w_tap += in_channels_per_group * stride_wk

    channel_out = group * out_channels_per_group + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channel_out, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EMIT_STATS:
        # Partial (count, sum, M2) of this tile per channel: BN statistics without re-reading y.
        valid = mask_m[:, None] & mask_n[None, :]
        tile_count = tl.sum(mask_m.to(tl.float32), axis=0)
        tile_sum = tl.sum(tl.where(valid, acc, 0.0), axis=0)
        deviation = tl.where(valid, acc - (tile_sum / tile_count)[None, :], 0.0)
        tl.store(stats_sum_ptr + pid_m * stride_sm + channel_out, tile_sum, mask=mask_n)
        tl.store(stats_m2_ptr + pid_m * stride_sm + channel_out, tl.sum(deviation * deviation, axis=0), mask=mask_n)
        tl.store(stats_count_ptr + pid_m, tile_count)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + image[:, None] * stride_rn + out_row[:, None] * stride_rh
            + out_col[:, None] * stride_rw + channel_out[None, :] * stride_rc,
            mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc += residual.to(tl.float32)
    if ACTIVATION == "relu":
        acc = relu_keep_nan(acc)
    if ROUND_BF16:
        acc = round_to_bf16_grid(acc)
    out_pointers = (out_ptr + image[:, None] * stride_on + out_row[:, None] * stride_oh
                    + out_col[:, None] * stride_ow + channel_out[None, :] * stride_oc)
    tl.store(out_pointers, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


AUTOTUNE_KEY = ["batch", "in_height", "in_width", "in_channels_per_group", "out_channels_per_group",
                "kernel_h", "kernel_w", "stride_h", "stride_w", "dilation_h", "dilation_w",
                "HAS_RESIDUAL", "EMIT_STATS", "DOT_IEEE", "DOT_UPCAST", "ROUND_BF16"]
conv2d_nhwc_autotuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
)(conv2d_nhwc_kernel)
STATS_RESET_TO_ZERO = ["stats_count_ptr"]
# Training variant: while autotuning, configs with different BLOCK_M write different numbers of
# partial-statistics rows; zeroing the row counts before the winning run drops the others' rows.
conv2d_nhwc_stats_autotuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    reset_to_zero=STATS_RESET_TO_ZERO,
)(conv2d_nhwc_kernel)

#: Tests set this to a ``triton.Config`` to bypass autotuning and run exactly that tile.
FORCED_CONFIG: Optional[triton.Config] = None

#: ``RESNET_FAST_TRITON_AUTOTUNE=off`` runs :func:`untuned_config` everywhere (no benchmarking: quick
#: test runs on a GPU, where first-time tuning of every shape costs minutes); ``full`` (default) tunes.
AUTOTUNE_ENV = settings.setting("triton_autotune").env


def autotune_enabled() -> bool:
    return settings.value("triton_autotune") == "full"


#: Autotune keys tuned in this process. Under CUDA graph capture an untuned layer runs a fixed
#: tile instead, since the autotuner's benchmark would synchronise inside the capture.
_tuned_layers: set[tuple] = set()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def untuned_config(x: torch.Tensor, in_per_group: int, out_per_group: int) -> triton.Config:
    """The tile a layer runs when it cannot be autotuned: the first config the prune keeps for it."""
    named_args = {"x_ptr": x, "in_channels_per_group": in_per_group, "out_channels_per_group": out_per_group}
    return prune_configs(GPU_CONFIGS, named_args)[0]


def interpreter_config(total_m: int, in_per_group: int, out_per_group: int) -> triton.Config:
    """The tile under ``TRITON_INTERPRET=1`` (nothing to time there): the interpreter pays per program
    and per ``tl`` call, not per element, so tiles are as large as the layer allows (channels up to
    512, pixels up to 256 but at most half of them, so test shapes still span two row blocks).
    Tests cover small multi-block tiles by forcing :data:`FORCED_CONFIG`."""
    return triton.Config({"BLOCK_M": _common.interpreter_block(total_m, 256),
                          "BLOCK_N": _common.interpreter_channels(out_per_group),
                          "BLOCK_K": _common.interpreter_channels(in_per_group),
                          "GROUP_M": 4}, num_stages=1, num_warps=1)


def pack_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, KH, KW) -> (g, KH, KW, C_in/g, C_out/g), contiguous: the kernel's B operand."""
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    per_group = weight.reshape(groups, out_channels // groups, in_per_group, kernel_h, kernel_w)
    return per_group.permute(0, 3, 4, 2, 1).contiguous()


def nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of an (N, C, H, W) tensor in the kernel's (n, h, w, c) argument order, whatever its layout."""
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_host(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
    stats: Optional[PartialStats] = None,
) -> torch.Tensor:
    """Host function: launch the conv; returns the channels_last output (and fills ``stats`` when given)."""
    groups, kernel_h, kernel_w, in_per_group, out_per_group = packed_weight.shape
    # NHWC input: each A-tile row is a run of contiguous channels (coalesced; a no-op when already so).
    x = x.contiguous(memory_format=torch.channels_last)
    batch, _, in_height, in_width = x.shape
    out_height = output_size(in_height, kernel_h, stride[0], padding[0], dilation[0])
    out_width = output_size(in_width, kernel_w, stride[1], padding[1], dilation[1])
    out = _common.empty_output((batch, groups * out_per_group, out_height, out_width), x.dtype, x.device,
                               torch.channels_last)
    weight_rows = packed_weight.reshape(groups, kernel_h * kernel_w * in_per_group, out_per_group)
    residual_strides = nhwc_strides(residual) if residual is not None else (0, 0, 0, 0)
    # TF32 exactly when cuDNN's convolutions may use it (the candidate this kernel races against);
    # fp16/bf16 dots are exact-product anyway.
    dot_ieee = x.dtype == torch.float32 and not _common.conv_allows_tf32()
    total_m = batch * out_height * out_width
    _common.check_rows(total_m)

    def grid(meta):
        return (triton.cdiv(total_m, meta["BLOCK_M"]) * triton.cdiv(out_per_group, meta["BLOCK_N"]), groups)

    arguments = [
        x,
        weight_rows,
        bias,
        residual,
        out,
        stats.sums if stats is not None else None,
        stats.m2s if stats is not None else None,
        stats.counts if stats is not None else None,
        batch,
        in_height,
        in_width,
        in_per_group,
        out_height,
        out_width,
        out_per_group,
        kernel_h,
        kernel_w,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        *nhwc_strides(x),
        *weight_rows.stride(),
        *residual_strides,
        *nhwc_strides(out),
        stats.sums.stride(0) if stats is not None else 0,
    ]
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ACTIVATION="relu" if relu else "",
                 EMIT_STATS=stats is not None, DOT_IEEE=dot_ieee,
                 # The interpreter's numpy dot reads bf16 as raw integers: widen first (exact products).
                 DOT_UPCAST=_common.interpreted() and x.dtype == torch.bfloat16,
                 ROUND_BF16=_common.interpreted() and x.dtype == torch.bfloat16)
    config = FORCED_CONFIG
    if config is None and _common.interpreted():
        config = interpreter_config(total_m, in_per_group, out_per_group)
    tune_key = (x.dtype, batch, in_height, in_width, in_per_group, out_per_group, kernel_h, kernel_w,
                *stride, *dilation, residual is not None, stats is not None, dot_ieee)
    if config is None and (not autotune_enabled() or tune_key not in _tuned_layers and _capturing(x.device)):
        config = untuned_config(x, in_per_group, out_per_group)
    if config is not None:
        _common.launcher(conv2d_nhwc_kernel)[grid](*arguments, **flags, **config.kwargs,
                                                  num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        autotuned = conv2d_nhwc_stats_autotuned if stats is not None else conv2d_nhwc_autotuned
        _common.launcher(autotuned)[grid](*arguments, **flags)
        _tuned_layers.add(tune_key)
    return out


def _output_shape(x, packed_weight, stride, padding, dilation):
    groups, kernel_h, kernel_w, _, out_per_group = packed_weight.shape
    return (x.shape[0], groups * out_per_group,
            output_size(x.shape[2], kernel_h, stride[0], padding[0], dilation[0]),
            output_size(x.shape[3], kernel_w, stride[1], padding[1], dilation[1]))


# ---------------------------------------------------------------------------- ops


def _conv_bias_act_fake(x, packed_weight, bias, residual, stride, padding, dilation, relu):
    shape = _output_shape(x, packed_weight, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=torch.channels_last)


@_common.define_op("triton_conv_bias_act", fake=_conv_bias_act_fake)
def conv_bias_act_op(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
) -> torch.Tensor:
    return conv_host(x, packed_weight, bias, residual, stride, padding, dilation, relu)


def _conv_stats_fake(x, weight, bias, stride, padding, dilation, groups):
    packed_shape = (groups, weight.shape[2], weight.shape[3], weight.shape[1], weight.shape[0] // groups)
    shape = _output_shape(x, torch.empty(packed_shape, device="meta"), stride, padding, dilation)
    y = torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=torch.channels_last)
    stats = x.new_empty((shape[1],), dtype=torch.float32)
    return y, stats, torch.empty_like(stats)


@_common.define_op("triton_conv_stats", fake=_conv_stats_fake)
def conv_stats_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, biased var)`` of ``y = conv2d(x, weight, bias)``, statistics from the conv epilogue."""
    packed = pack_weight(weight, groups)
    shape = _output_shape(x, packed, stride, padding, dilation)
    stats = PartialStats(triton.cdiv(shape[0] * shape[2] * shape[3], MIN_BLOCK_M), shape[1], x.device)
    y = conv_host(x, packed, bias, None, stride, padding, dilation, False, stats)
    mean, var = finalize_stats(stats)
    return y, mean, var


def _conv_stats_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.bias_shape = None if bias is None else list(bias.shape)


def _conv_stats_backward(ctx, grad_y, _grad_mean, _grad_var):
    """Conv backward stays with cuDNN / oneDNN; ``mean``/``var`` carry no gradient of their own.

    The consumer (``bn_act``) already differentiates through the statistics and
    folds that into ``grad_y``.
    """
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_shape is not None
                   and ctx.needs_input_grad[2]]
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_y, x, weight, ctx.bias_shape, stride, padding, dilation, False, [0, 0], groups, output_mask)
    return grad_x, grad_weight, grad_bias, None, None, None, None


conv_stats_op.register_autograd(_conv_stats_backward, setup_context=_conv_stats_setup_context)


# ---------------------------------------------------------------------------- public


def conv_bias_act(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    relu: bool,
) -> torch.Tensor:
    """Fused conv + bias + residual + ReLU on a packed weight (:func:`pack_weight`); channels_last output.

    Not differentiable. Equivalent PyTorch::

        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        out = F.relu(out + residual)
    """
    return conv_bias_act_op(x, packed_weight, bias, residual, list(stride), list(padding), list(dilation), relu)


def conv_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training conv: ``y`` (channels_last) and its per-channel batch mean and biased variance (float32).

    Differentiable w.r.t. ``x``, ``weight``, ``bias`` through ``y`` only. Equivalent PyTorch::

        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    """
    return conv_stats_op(x, weight, bias, list(stride), list(padding), list(dilation), groups)
