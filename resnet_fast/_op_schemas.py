"""Schemas of the ``resnet_fast`` ops, defined once, with their fake (meta) kernels.

The compiled extension only adds ``TORCH_LIBRARY_IMPL(resnet_fast, CPU|CUDA, m)``
kernels for these schemas, so the schemas and fake kernels exist (and
``torch.compile`` can trace through them) whether or not ``resnet_fast._C`` is built.

Per-channel parameters (``scale``, ``shift``, ``mean``, ``invstd``, ``weight``)
are float32 vectors of length C (float64 for float64 activations); activations keep their dtype and memory format.
"""

from __future__ import annotations

import torch

NAMESPACE = "resnet_fast"

_lib = torch.library.Library(NAMESPACE, "DEF")

# out = act(y * scale[c] + shift[c] + residual); scale=None means 1.
_lib.define("bn_act_forward(Tensor y, Tensor? scale, Tensor shift, Tensor? residual, bool relu) -> Tensor")
# Per-channel mean and biased variance over (N, H, W), accumulated in at least float32.
_lib.define("batch_stats(Tensor y) -> (Tensor mean, Tensor var)")
# Training forward in one op: batch statistics of y, then act(batch_norm(y) + residual).
# Returns out and the batch mean and biased variance (the statistics' dtype, as batch_stats).
_lib.define(
    "bn_act_train_forward(Tensor y, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool relu) "
    "-> (Tensor out, Tensor mean, Tensor var)"
)
# Backward of out = act(weight * (y - mean) * invstd + bias + residual) with batch statistics.
# Returns grad_y, grad_weight, grad_bias and grad_residual (empty when residual_grad is False).
_lib.define(
    "bn_act_backward(Tensor grad_out, Tensor out, Tensor y, Tensor mean, Tensor invstd, Tensor? weight, "
    "bool relu, bool residual_grad) -> (Tensor grad_y, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)"
)

# Winograd F(2x2, 3x3) weight transform of a (K, C, 3, 3) weight: float32 (16, ceil(K/16), C, 16) panels.
_lib.define("winograd_weight(Tensor weight) -> Tensor")
# act(conv2d(x, weight, bias, padding=1) + residual) for a 3x3 stride-1 weight given as winograd_weight(weight);
# float32, output channels_last.
_lib.define("winograd_conv3x3(Tensor x, Tensor packed_weight, Tensor bias, Tensor? residual, bool relu) -> Tensor")
# The same on activations in 8-channel blocks, (N, C/8, H, W, 8) -> (N, K/8, H, W, 8) (resnet_fast.ops.blocked).
_lib.define("winograd_conv3x3_blocked(Tensor x, Tensor packed_weight, Tensor bias, Tensor? residual, bool relu) "
            "-> Tensor")
# A (K, C, k, k) weight packed for blocked_conv: float32 (ceil(K/16), k, k, C, 16) panels.
_lib.define("blocked_conv_weight(Tensor weight) -> Tensor")
# act(conv2d(x, weight, bias, stride, padding) + residual) on 8-channel blocks, the weight given as
# blocked_conv_weight(weight): (N, C/8, H, W, 8) -> (N, K/8, Ho, Wo, 8), float32.
_lib.define("blocked_conv(Tensor x, Tensor packed_weight, Tensor bias, Tensor? residual, bool relu, int stride, "
            "int padding) -> Tensor")
# max_pool2d(x, kernel, stride, padding) of a channels_last (N, C, H, W) float32 x, returned in 8-channel
# blocks (N, C/8, Ho, Wo, 8).
_lib.define("max_pool_to_blocked(Tensor x, int kernel, int stride, int padding) -> Tensor")
# The same with the residual in out, overwritten by the result: out = act(conv2d(x, ...) + bias + out).
_lib.define("blocked_conv_add_(Tensor x, Tensor packed_weight, Tensor bias, Tensor(a!) out, bool relu, int stride, "
            "int padding) -> ()")

# A 64-bit fingerprint of the tensors' contents (same bytes -> same value; any edit, in place or through
# .data, changes it with overwhelming probability): the fold cache's guard against stale folded weights.
_lib.define("content_fingerprint(Tensor[] tensors) -> int")

WINOGRAD_POSITIONS = 16
PANEL_COLUMNS = 16  # output channels per packed weight panel (csrc/cpu/micro_kernel.h)
CHANNEL_BLOCK = 8  # channels per block of the blocked activation layout (csrc/cpu/blocked_layout.h)


def _stats_dtype(y: torch.Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _channels(y: torch.Tensor) -> int:
    torch._check(y.dim() >= 2, lambda: f"expected a tensor of at least 2 dimensions (N, C, ...), got {y.dim()}")
    return y.shape[1]


@torch.library.register_fake(f"{NAMESPACE}::bn_act_forward")
def _bn_act_forward_fake(y, scale, shift, residual, relu):
    _channels(y)
    return torch.empty_like(y)


@torch.library.register_fake(f"{NAMESPACE}::batch_stats")
def _batch_stats_fake(y):
    channels = _channels(y)
    stats = y.new_empty((channels,), dtype=_stats_dtype(y))
    return stats, torch.empty_like(stats)


@torch.library.register_fake(f"{NAMESPACE}::bn_act_train_forward")
def _bn_act_train_forward_fake(y, weight, bias, residual, eps, relu):
    channels = _channels(y)
    stats = y.new_empty((channels,), dtype=_stats_dtype(y))
    return torch.empty_like(y), stats, torch.empty_like(stats)


@torch.library.register_fake(f"{NAMESPACE}::bn_act_backward")
def _bn_act_backward_fake(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    channels = _channels(y)
    grad_residual = torch.empty_like(y) if residual_grad else y.new_empty((0,))
    return (
        torch.empty_like(y),
        y.new_empty((channels,), dtype=_stats_dtype(y)),
        y.new_empty((channels,), dtype=_stats_dtype(y)),
        grad_residual,
    )


@torch.library.register_fake(f"{NAMESPACE}::winograd_weight")
def _winograd_weight_fake(weight):
    torch._check(weight.dim() == 4, lambda: f"winograd_weight: weight must be (K, C, 3, 3), got {tuple(weight.shape)}")
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    columns = _winograd_panel_columns()
    panels = (out_channels + columns - 1) // columns
    return weight.new_empty((WINOGRAD_POSITIONS, panels, in_channels, columns), dtype=torch.float32)


def _winograd_panel_columns() -> int:
    """Panel width of the CPU kernels' packed Winograd weights: 16 (AVX2) or 32 (AVX-512), per the ISA
    variant the extension chose at load (csrc/cpu/isa_dispatch_cpu.cpp)."""
    from resnet_fast import _extension

    return int(_extension.build_info().get("winograd_panel_columns") or PANEL_COLUMNS)


@torch.library.register_fake(f"{NAMESPACE}::winograd_conv3x3")
def _winograd_conv3x3_fake(x, packed_weight, bias, residual, relu):
    torch._check(x.dim() == 4, lambda: f"winograd_conv3x3: x must be 4-d (N, C, H, W), got {tuple(x.shape)}")
    batch, _, height, width = x.shape
    return x.new_empty((batch, bias.shape[0], height, width)).contiguous(memory_format=torch.channels_last)


def _window_count(size, kernel: int, stride: int, padding: int):
    """Output length of a convolution or pool window along one dimension (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def _check_blocked(op: str, x) -> None:
    torch._check(x.dim() == 5 and x.shape[4] == CHANNEL_BLOCK,
                 lambda: f"{op}: x must be in 8-channel blocks, shape (N, C/8, H, W, 8), got {tuple(x.shape)}")


@torch.library.register_fake(f"{NAMESPACE}::winograd_conv3x3_blocked")
def _winograd_conv3x3_blocked_fake(x, packed_weight, bias, residual, relu):
    _check_blocked("winograd_conv3x3_blocked", x)
    batch, _, height, width, _ = x.shape
    return x.new_empty((batch, bias.shape[0] // CHANNEL_BLOCK, height, width, CHANNEL_BLOCK))


@torch.library.register_fake(f"{NAMESPACE}::blocked_conv_weight")
def _blocked_conv_weight_fake(weight):
    torch._check(weight.dim() == 4,
                 lambda: f"blocked_conv_weight: weight must be (K, C, k, k), got {tuple(weight.shape)}")
    out_channels, in_channels, kernel = weight.shape[0], weight.shape[1], weight.shape[2]
    panels = (out_channels + PANEL_COLUMNS - 1) // PANEL_COLUMNS
    return weight.new_empty((panels, kernel, kernel, in_channels, PANEL_COLUMNS), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::blocked_conv")
def _blocked_conv_fake(x, packed_weight, bias, residual, relu, stride, padding):
    _check_blocked("blocked_conv", x)
    batch, _, height, width, _ = x.shape
    kernel = packed_weight.shape[1]
    out_h, out_w = _window_count(height, kernel, stride, padding), _window_count(width, kernel, stride, padding)
    return x.new_empty((batch, bias.shape[0] // CHANNEL_BLOCK, out_h, out_w, CHANNEL_BLOCK))


@torch.library.register_fake(f"{NAMESPACE}::blocked_conv_add_")
def _blocked_conv_add_fake(x, packed_weight, bias, out, relu, stride, padding):
    _check_blocked("blocked_conv_add_", x)
    return None


@torch.library.register_fake(f"{NAMESPACE}::max_pool_to_blocked")
def _max_pool_to_blocked_fake(x, kernel, stride, padding):
    torch._check(x.dim() == 4, lambda: f"max_pool_to_blocked: x must be (N, C, H, W), got {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    out_h, out_w = _window_count(height, kernel, stride, padding), _window_count(width, kernel, stride, padding)
    return x.new_empty((batch, channels // CHANNEL_BLOCK, out_h, out_w, CHANNEL_BLOCK))
