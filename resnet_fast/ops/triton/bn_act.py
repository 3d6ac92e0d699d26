"""Training-mode BatchNorm (batch statistics given) + residual + ReLU, forward and fused backward.

Forward: ``out = act((y - mean) * invstd * weight + bias + residual)`` in one pass;
it keeps ``out`` for the backward (the ReLU mask is ``out > 0``, as for ``torch.relu``).

NaN and Inf propagate as in ``torch.relu`` and its backward (``threshold_backward``):
``relu(NaN) = NaN`` and the grad passes where ``out`` is NaN. Every kernel (the conv's
epilogue too) applies the two helpers below, :func:`relu_keep_nan` and :func:`relu_grad`,
never ``tl.maximum`` (tests/test_triton.py guards the sources).

Backward, with ``g = threshold_backward(grad_out, out, 0)`` (0 where ``out <= 0``) and per
channel ``sum_g = sum(g)``, ``sum_gc = sum(g * (y - mean))`` over the ``count = N*H*W`` values:

    grad_bias     = sum_g
    grad_weight   = sum_gc * invstd
    grad_y        = weight * invstd * (g - sum_g / count - (y - mean) * invstd**2 * sum_gc / count)
    grad_residual = g

as one reduction pass (deterministic partial sums) and one element-wise pass.
The same forward kernel without statistics is the inference epilogue after a
vendor conv: ``out = act(y + bias + residual)``.

Reference -> kernels -> host functions -> ops -> public functions.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from resnet_fast.ops.triton import _common
from resnet_fast.ops.triton._rounding import round_to_bf16_grid


def bn_act_reference(
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    relu: bool,
) -> torch.Tensor:
    """Equivalent PyTorch (``mean``/``var`` are the batch statistics, var biased)."""
    shape = (1, -1, 1, 1)
    out = (y - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


@triton.jit
def relu_keep_nan(x):
    """``torch.relu``: 0 where ``x < 0``, else ``x``; NaN stays NaN (and -0.0 stays -0.0).

    An explicit compare + select, whose lowering is the same everywhere: ``tl.maximum(x, 0.0)``
    (``propagate_nan=NONE``) is a maxnum, which returns 0 for NaN on the GPU."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def relu_grad(grad, out):
    """ReLU backward as ``threshold_backward(grad, out, 0)``: 0 where ``out <= 0``, else ``grad``,
    so the grad passes where ``out`` is NaN (``tl.where(out > 0, grad, 0)`` would drop it)."""
    return tl.where(out <= 0.0, 0.0, grad)


@triton.jit
def bn_act_forward_kernel(
    y_ptr,
    mean_ptr,
    var_ptr,
    weight_ptr,
    bias_ptr,
    residual_ptr,
    out_ptr,
    batch,
    channels,
    pixels,
    eps,
    stride_yn,
    stride_yp,
    stride_yc,
    stride_rn,
    stride_rp,
    stride_rc,
    stride_on,
    stride_op,
    stride_oc,
    HAS_STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < batch * pixels
    mask_c = offs_c < channels
    mask = mask_m[:, None] & mask_c[None, :]
    image = (offs_m // pixels).to(tl.int64)  # image * stride_n may pass 2**31
    pixel = offs_m % pixels

    # Per-channel affine map y * scale + shift, built in float32 from the statistics.
    scale = tl.full((BLOCK_C,), 1.0, dtype=tl.float32)
    shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_STATS:
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
        scale = 1.0 / tl.sqrt(var + eps)
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
        shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)

    y = tl.load(y_ptr + image[:, None] * stride_yn + pixel[:, None] * stride_yp + offs_c[None, :] * stride_yc,
                mask=mask, other=0.0).to(tl.float32)
    out = y * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + image[:, None] * stride_rn + pixel[:, None] * stride_rp + offs_c[None, :] * stride_rc,
            mask=mask, other=0.0)
        out += residual.to(tl.float32)
    if ACTIVATION == "relu":
        out = relu_keep_nan(out)
    if ROUND_BF16:
        out = round_to_bf16_grid(out)
    tl.store(out_ptr + image[:, None] * stride_on + pixel[:, None] * stride_op + offs_c[None, :] * stride_oc,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_act_backward_reduce_kernel(
    grad_out_ptr,
    out_ptr,
    y_ptr,
    mean_ptr,
    sum_g_ptr,
    sum_gc_ptr,
    batch,
    channels,
    pixels,
    rows_per_program,
    stride_gn,
    stride_gp,
    stride_gc,
    stride_on,
    stride_op,
    stride_oc,
    stride_yn,
    stride_yp,
    stride_yc,
    stride_sm,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (s, c): partial ``sum(g)`` and ``sum(g * (y - mean))`` over one slice of rows."""
    pid_split = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    row_start = pid_split * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, batch * pixels)

    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile_start in range(row_start, row_end, BLOCK_M):
        offs_m = tile_start + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_c[None, :]
        image = (offs_m // pixels).to(tl.int64)  # image * stride_n may pass 2**31
        pixel = offs_m % pixels
        g = tl.load(grad_out_ptr + image[:, None] * stride_gn + pixel[:, None] * stride_gp
                    + offs_c[None, :] * stride_gc, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION == "relu":
            out = tl.load(out_ptr + image[:, None] * stride_on + pixel[:, None] * stride_op
                          + offs_c[None, :] * stride_oc, mask=mask, other=0.0)
            g = relu_grad(g, out)
        y = tl.load(y_ptr + image[:, None] * stride_yn + pixel[:, None] * stride_yp + offs_c[None, :] * stride_yc,
                    mask=mask, other=0.0).to(tl.float32)
        centered = tl.where(mask, y - mean[None, :], 0.0)
        sum_g += tl.sum(g, axis=0)
        sum_gc += tl.sum(g * centered, axis=0)

    tl.store(sum_g_ptr + pid_split * stride_sm + offs_c, sum_g, mask=mask_c)
    tl.store(sum_gc_ptr + pid_split * stride_sm + offs_c, sum_gc, mask=mask_c)


@triton.jit
def bn_act_backward_kernel(
    grad_out_ptr,
    out_ptr,
    y_ptr,
    mean_ptr,
    var_ptr,
    weight_ptr,
    sum_g_ptr,
    sum_gc_ptr,
    grad_y_ptr,
    grad_residual_ptr,
    batch,
    channels,
    pixels,
    eps,
    stride_gn,
    stride_gp,
    stride_gc,
    stride_on,
    stride_op,
    stride_oc,
    stride_yn,
    stride_yp,
    stride_yc,
    stride_dn,
    stride_dp,
    stride_dc,
    HAS_WEIGHT: tl.constexpr,
    WRITE_RESIDUAL_GRAD: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``grad_y`` (and ``grad_residual = g``) from the per-channel sums; both share ``y``'s strides."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    count = batch * pixels
    mask_c = offs_c < channels
    mask = (offs_m < count)[:, None] & mask_c[None, :]
    image = (offs_m // pixels).to(tl.int64)  # image * stride_n may pass 2**31
    pixel = offs_m % pixels

    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32) + eps)
    gain = invstd
    if HAS_WEIGHT:
        gain = gain * tl.load(weight_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
    mean_g = tl.load(sum_g_ptr + offs_c, mask=mask_c, other=0.0) / count
    mean_gc = tl.load(sum_gc_ptr + offs_c, mask=mask_c, other=0.0) / count

    g = tl.load(grad_out_ptr + image[:, None] * stride_gn + pixel[:, None] * stride_gp + offs_c[None, :] * stride_gc,
                mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "relu":
        out = tl.load(out_ptr + image[:, None] * stride_on + pixel[:, None] * stride_op + offs_c[None, :] * stride_oc,
                      mask=mask, other=0.0)
        g = relu_grad(g, out)
    y = tl.load(y_ptr + image[:, None] * stride_yn + pixel[:, None] * stride_yp + offs_c[None, :] * stride_yc,
                mask=mask, other=0.0).to(tl.float32)
    centered = y - mean[None, :]
    grad_y = gain[None, :] * (g - mean_g[None, :] - centered * (invstd * invstd * mean_gc)[None, :])
    if ROUND_BF16:
        grad_y = round_to_bf16_grid(grad_y)
    destination = image[:, None] * stride_dn + pixel[:, None] * stride_dp + offs_c[None, :] * stride_dc
    tl.store(grad_y_ptr + destination, grad_y.to(grad_y_ptr.dtype.element_ty), mask=mask)
    if WRITE_RESIDUAL_GRAD:
        tl.store(grad_residual_ptr + destination, g.to(grad_residual_ptr.dtype.element_ty), mask=mask)


def _interpreted_bf16(t: torch.Tensor) -> bool:
    """bf16 output under the interpreter, whose float32 -> bf16 cast truncates (see ``_rounding``)."""
    return _common.interpreted() and t.dtype == torch.bfloat16


def _elementwise_blocks(rows: int, channels: int) -> tuple[int, int]:
    if _common.interpreted():
        return _common.interpreter_block(rows), _common.interpreter_channels(channels)
    # 64 x 64 fp32 tile = 16 KiB of registers per operand at 4 warps: memory-bound, no need for more.
    return 64, 64


def bn_act_forward_host(
    y: torch.Tensor,
    mean: Optional[torch.Tensor],
    var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    relu: bool,
) -> torch.Tensor:
    """Host function: ``out`` in ``y``'s memory format. ``mean=None`` means no normalisation."""
    y, y_strides = _common.flat_pixel_view(y)
    out = _common.empty_output_like(y)
    _, out_strides = _common.flat_pixel_view(out)
    residual_strides = (0, 0, 0)
    if residual is not None:
        residual, residual_strides = _common.flat_pixel_view(residual)
    batch, channels, height, width = y.shape
    pixels = height * width
    _common.check_rows(batch * pixels)
    block_m, block_c = _elementwise_blocks(batch * pixels, channels)
    grid = (triton.cdiv(batch * pixels, block_m), triton.cdiv(channels, block_c))
    has_stats = mean is not None
    _common.launcher(bn_act_forward_kernel)[grid](
        y,
        mean if has_stats else y,
        var if has_stats else y,
        weight if weight is not None else y,
        bias if bias is not None else y,
        residual if residual is not None else y,
        out,
        batch,
        channels,
        pixels,
        eps,
        *y_strides,
        *residual_strides,
        *out_strides,
        HAS_STATS=has_stats,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION="relu" if relu else "",
        ROUND_BF16=_interpreted_bf16(out),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
    )
    return out


def bn_act_backward_host(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    relu: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host function: (grad_y, grad_weight, grad_bias, grad_residual); grads of params in float32."""
    grad_out, grad_strides = _common.flat_pixel_view(grad_out)
    out, out_strides = _common.flat_pixel_view(out)
    y, y_strides = _common.flat_pixel_view(y)
    batch, channels, height, width = y.shape
    pixels = height * width
    rows = batch * pixels
    _common.check_rows(rows)
    if channels == 0 or rows == 0:  # no programs to spread; sums over nothing are 0
        zeros = y.new_zeros((channels,), dtype=torch.float32)
        grad_residual = torch.empty_like(y) if residual_grad else y.new_empty((0,))
        return torch.empty_like(y), zeros, zeros.clone(), grad_residual
    block_m, block_c = _elementwise_blocks(rows, channels)
    reduce_warps = 4
    if not _common.interpreted():
        # The reduction keeps three tiles live per step: at 64 x 64 on 4 warps triton 3.6 spills ~400 bytes
        # per thread for sm_90 (benchmarks/triton_sm90_check.py); 64 x 32 on 8 warps takes ~120 registers.
        block_c, reduce_warps = 32, 8
    channel_blocks = triton.cdiv(channels, block_c)
    target_programs = 8 if _common.interpreted() else 1024
    splits = max(1, min(triton.cdiv(rows, block_m), triton.cdiv(target_programs, channel_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
    splits = triton.cdiv(rows, rows_per_program)
    partial_g = torch.empty((splits, channels), dtype=torch.float32, device=y.device)
    partial_gc = torch.empty((splits, channels), dtype=torch.float32, device=y.device)
    activation = "relu" if relu else ""
    _common.launcher(bn_act_backward_reduce_kernel)[(splits, channel_blocks)](
        grad_out,
        out,
        y,
        mean,
        partial_g,
        partial_gc,
        batch,
        channels,
        pixels,
        rows_per_program,
        *grad_strides,
        *out_strides,
        *y_strides,
        partial_g.stride(0),
        ACTIVATION=activation,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=reduce_warps,
    )
    # Summing a (splits, C) float32 array is tiny next to the two passes over (N, C, H, W).
    sum_g = partial_g.sum(dim=0)
    sum_gc = partial_gc.sum(dim=0)
    grad_y = _common.empty_output_like(y)
    _, grad_y_strides = _common.flat_pixel_view(grad_y)
    grad_residual = _common.empty_output_like(y) if residual_grad else y.new_empty((0,))
    _common.launcher(bn_act_backward_kernel)[(triton.cdiv(rows, block_m), channel_blocks)](
        grad_out,
        out,
        y,
        mean,
        var,
        weight if weight is not None else y,
        sum_g,
        sum_gc,
        grad_y,
        grad_residual if residual_grad else grad_y,
        batch,
        channels,
        pixels,
        eps,
        *grad_strides,
        *out_strides,
        *y_strides,
        *grad_y_strides,
        HAS_WEIGHT=weight is not None,
        WRITE_RESIDUAL_GRAD=residual_grad,
        ACTIVATION=activation,
        ROUND_BF16=_interpreted_bf16(grad_y),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
    )
    grad_weight = sum_gc * torch.rsqrt(var + eps)
    return grad_y, grad_weight, sum_g, grad_residual


# ---------------------------------------------------------------------------- ops


def _bn_act_fake(y, mean, var, weight, bias, residual, eps, relu):
    return torch.empty_like(y)


@_common.define_op("triton_bn_act", fake=_bn_act_fake)
def bn_act_op(
    y: torch.Tensor,
    mean: Optional[torch.Tensor],
    var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    relu: bool,
) -> torch.Tensor:
    return bn_act_forward_host(y, mean, var, weight, bias, residual, eps, relu)


def _bn_act_backward_fake(grad_out, out, y, mean, var, weight, eps, relu, residual_grad):
    channels = y.shape[1]
    return (torch.empty_like(y), y.new_empty((channels,), dtype=torch.float32),
            y.new_empty((channels,), dtype=torch.float32),
            torch.empty_like(y) if residual_grad else y.new_empty((0,)))


@_common.define_op("triton_bn_act_backward", fake=_bn_act_backward_fake)
def bn_act_backward_op(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    relu: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return bn_act_backward_host(grad_out, out, y, mean, var, weight, eps, relu, residual_grad)


def _setup_context(ctx, inputs, output) -> None:
    y, mean, var, weight, bias, residual, eps, relu = inputs
    if mean is None:
        raise RuntimeError("resnet_fast::triton_bn_act is differentiable only with batch statistics")
    ctx.save_for_backward(y, output, mean, var, weight)
    ctx.eps = eps
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad_out):
    """The whole BN backward w.r.t. ``y``, including the path through ``mean``/``var``.

    ``mean`` and ``var`` are the batch statistics of ``y``, so they get no
    gradient of their own: whoever computed them must not be differentiated
    through them (``batch_stats`` detaches; the conv+stats op ignores them).
    """
    y, out, mean, var, weight = ctx.saved_tensors
    need_residual = ctx.has_residual and ctx.needs_input_grad[5]
    grad_y, grad_weight, grad_bias, grad_residual = bn_act_backward_op(
        grad_out, out, y, mean, var, weight, ctx.eps, ctx.relu, need_residual)
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (
        grad_y,
        None,
        None,
        None if weight_dtype is None else grad_weight.to(weight_dtype),
        None if bias_dtype is None else grad_bias.to(bias_dtype),
        grad_residual if need_residual else None,
        None,
        None,
    )


bn_act_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- public


def bn_act(
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    relu: bool,
) -> torch.Tensor:
    """BatchNorm with the given batch statistics + residual + ReLU; differentiable w.r.t. y, weight, bias, residual.

    Equivalent PyTorch (gradients included, ``mean``/``var`` being ``y``'s batch statistics)::

        out = F.batch_norm(y, None, None, weight, bias, training=True, eps=eps)
        out = F.relu(out + residual)
    """
    return bn_act_op(y, mean, var, weight, bias, residual, eps, relu)


def bias_act(y: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """Inference epilogue after a vendor conv; not differentiable.

    Equivalent PyTorch: ``F.relu(y + bias[None, :, None, None] + residual)``.
    """
    return bn_act_op(y, None, None, None, bias, residual, 0.0, relu)
