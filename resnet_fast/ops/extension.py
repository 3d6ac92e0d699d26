"""The ``extension`` backend: the compiled kernels of ``resnet_fast._C`` (CPU and CUDA).

The C++/CUDA side implements the primitive ops (schemas in ``resnet_fast/_op_schemas.py``);
this module composes them into the two units every backend provides, with the
training unit's autograd: one fused op forward, one fused op backward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from resnet_fast import _extension, settings
from resnet_fast import _op_schemas  # noqa: F401  (schemas)
from resnet_fast.ops import update_running_stats
from resnet_fast.ops.folding import ConvGeometry, FoldedConv, tensor_version
from resnet_fast.ops import cpu_conv, cpu_select, reference, trace

_ops = torch.ops.resnet_fast
# Loading resnet_fast._C registers its CPU/CUDA kernels for the schemas (never raises; see _extension).
_extension.extension()


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# oneDNN convolution with fused post-ops: what inductor's freezing pass emits on CPU.
_MKLDNN_OPS = ("_convolution_pointwise", "_reorder_convolution_weight")
# dtypes whose oneDNN path failed once on this CPU (e.g. bf16 without AVX512-BF16/AVX-NE-CONVERT).
_mkldnn_unsupported_dtypes: set = set()


# Facts of this torch build and CPU, read once: torch.compile cannot trace the queries themselves.
_MKLDNN_AVAILABLE = torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, name)
                                                                  for name in _MKLDNN_OPS)


def _mkldnn_available() -> bool:
    return _MKLDNN_AVAILABLE


def _cached_packed_weight(folded: FoldedConv, name: str,
                          pack: Callable[[], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """``folded.packed[name]``: ``pack()`` made once per weight and kept (a None result is not kept)."""
    # Keyed on the weight's identity and version too, so an in-place edit can never leave it stale
    # (an inference tensor has no version: its pack is made on each call, never kept).
    version = tensor_version(folded.weight)
    key = (folded.weight.dtype, folded.weight.data_ptr(), version)
    cached = folded.packed.get(name)
    if version is not None and cached is not None and cached[0] == key:
        return cached[1]
    # Outside inference mode, so that a pack made under it serves later grad-mode calls as well.
    with torch.inference_mode(False), torch.no_grad():
        packed = pack()
    if packed is not None and version is not None:
        folded.packed[name] = (key, packed)
    return packed


def _mkldnn_packed_weight(folded: FoldedConv, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The folded weight reordered once into oneDNN's blocked layout, cached in ``folded.packed``.

    A packed weight is valid for any input size (the size only guides oneDNN's choice of layout).
    Returns None when oneDNN cannot run this dtype on this CPU.
    """

    def reorder() -> Optional[torch.Tensor]:
        if folded.weight.dtype in _mkldnn_unsupported_dtypes:
            return None
        g = folded.geometry
        try:
            return torch.ops.mkldnn._reorder_convolution_weight(
                folded.weight.detach().contiguous(), list(g.padding), list(g.stride), list(g.dilation), g.groups,
                list(x.shape))
        except RuntimeError:
            _mkldnn_unsupported_dtypes.add(folded.weight.dtype)
            return None

    return _cached_packed_weight(folded, "mkldnn", reorder)


def _conv_bias_act_mkldnn(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor],
                          relu: bool) -> Optional[torch.Tensor]:
    """One oneDNN call: conv + bias, then a binary ``add`` (residual) post-op, and ReLU in place. None if unsupported
    (also under torch.compile: oneDNN's weight reorder has no fake kernel to trace)."""
    if torch.compiler.is_compiling():
        return None
    if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 4
            and folded.weight.dtype == x.dtype and _mkldnn_available()):
        return None
    if residual is not None and residual.dtype != x.dtype:
        return None
    packed = _mkldnn_packed_weight(folded, x)
    if packed is None:
        return None
    g = folded.geometry
    x = x.contiguous(memory_format=torch.channels_last)
    bias = folded.bias.detach().to(x.dtype)
    geometry = (list(g.padding), list(g.stride), list(g.dilation), g.groups)
    # oneDNN's ReLU post-op maps NaN to 0 where torch.relu keeps it, so the ReLU runs after, in place.
    if residual is None:
        out = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *geometry, "none", [None], "")
    elif residual.shape[-2:] == (1, 1):
        # torch < 2.14 fails the binary post-op on 1x1 outputs ("could not create a memory"); one pixel
        # per channel costs nothing to add separately.
        out = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *geometry, "none", [None], "")
        out.add_(residual)
    else:
        residual = residual.contiguous(memory_format=torch.channels_last)
        out = torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, packed, bias, *geometry, "add", None, None, [None], "")
    return out.relu_() if relu else out


def winograd_shape(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor]) -> bool:
    """Whether the Winograd kernel can run this unit: CPU float32, 3x3, stride 1, padding 1, groups 1."""
    g, weight = folded.geometry, folded.weight
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and weight.dtype == torch.float32
            and tuple(weight.shape[-2:]) == (3, 3) and weight.shape[1] == x.shape[1]
            and tuple(g.stride) == (1, 1) and tuple(g.padding) == (1, 1) and tuple(g.dilation) == (1, 1)
            and g.groups == 1 and (residual is None or residual.dtype == torch.float32))


def _winograd_packed_weight(folded: FoldedConv) -> torch.Tensor:
    """The folded weight's Winograd transform, made once and cached in ``folded.packed["winograd"]``."""
    if torch.compiler.is_compiling():
        return _ops.winograd_weight(folded.weight.detach())
    return _cached_packed_weight(folded, "winograd", lambda: _ops.winograd_weight(folded.weight.detach()))


def winograd_unit(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """resnet_fast's Winograd F(2x2, 3x3) kernel, bias + residual + ReLU fused into its output transform;
    channels_last output. Equivalent PyTorch: ``relu(F.conv2d(x, w, b, padding=1) + residual)``."""
    bias = folded.bias.detach().to(torch.float32)
    return _ops.winograd_conv3x3(x, _winograd_packed_weight(folded), bias, residual, relu)


def onednn_unit(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """One oneDNN convolution with bias and residual post-ops where oneDNN runs this dtype here, else
    :func:`epilogue_unit`. Equivalent PyTorch: ``relu(F.conv2d(x, w, b, **geometry) + residual)``."""
    out = _conv_bias_act_mkldnn(x, folded, residual, relu)
    return out if out is not None else epilogue_unit(x, folded, residual, relu)


def epilogue_unit(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """The vendor convolution (cuDNN / oneDNN) without bias, then one fused ``bn_act_forward`` pass for
    bias + residual + ReLU (output in the conv output's format)."""
    y = reference.conv2d(x, folded.weight, None, folded.geometry)
    bias = folded.bias.to(torch.float64 if y.dtype == torch.float64 else torch.float32)
    return _ops.bn_act_forward(y, None, bias, residual, relu)


def choose_conv3x3(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor],
                   relu: bool) -> tuple[str, str]:
    """``("winograd" | "onednn", why)`` for a unit :func:`winograd_shape` accepts.

    ``RESNET_FAST_CPU_CONV3X3=winograd|onednn`` forces one; ``auto`` times both once per shape and
    thread count (``resnet_fast.ops.cpu_select``). While ``torch.compile`` traces, nothing can be
    timed: a time measured before is used, else the Winograd kernel (an op the compiler can trace).
    """
    forced = settings.value("cpu_conv3x3")
    if forced != "auto":
        return forced, f"RESNET_FAST_CPU_CONV3X3={forced}"
    if torch.compiler.is_compiling():
        return "winograd", "rule: nothing is timed while torch.compile traces"
    g = folded.geometry
    keys = {name: cpu_select.signature(name, x.shape, folded.weight.shape, g.stride, g.padding,
                                       residual is not None, relu) for name in ("winograd", "onednn")}
    x = x.contiguous(memory_format=torch.channels_last)
    candidates = {name: (keys[name], lambda unit=unit: unit(x, folded, residual, relu))
                  for name, unit in (("winograd", winograd_unit), ("onednn", onednn_unit))}
    chosen, times = cpu_select.fastest(candidates)
    return chosen, "measured: " + cpu_select.describe_times(times, chosen)


def conv_bias_act(x: torch.Tensor, folded: FoldedConv, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """Inference unit: ``relu(conv2d(x, folded.weight, folded.bias) + residual)``.

    Equivalent PyTorch: ``relu(conv2d(x, folded.weight, folded.bias, **geometry) + residual)``.

    * CPU float32 3x3 stride 1 (the residual blocks' main convolution): resnet_fast's Winograd kernel
      (:func:`winograd_unit`) or oneDNN's, whichever :func:`choose_conv3x3` measured faster.
    * Other CPU float32 (and bfloat16 where oneDNN supports it on this CPU): one oneDNN
      convolution with the bias and residual add as post-ops (ReLU in place after it), on a weight
      pre-packed once (cached in ``folded.packed["mkldnn"]``). Channels_last is the
      working layout: an NCHW input/residual is converted once, and the output is
      channels_last whatever the input's format (keep activations channels_last
      to avoid the conversion).
    * Otherwise (CUDA, other dtypes, no oneDNN): :func:`epilogue_unit`.
    * When autograd needs gradients through the unit, the differentiable reference path.

    A model's CPU execution plan (``resnet_fast.models.plan``) calls the kernels directly instead.
    """
    if _needs_grad(x, folded.weight, folded.bias, residual):
        trace.record("reference", "autograd needs gradients through the unit")
        return reference.conv_bias_act(x, folded, residual, relu)
    why = "rule: oneDNN conv with bias and add post-ops, the only fused kernel for this shape and dtype"
    if winograd_shape(x, folded, residual):
        kernel, why = choose_conv3x3(x, folded, residual, relu)
        if kernel == "winograd":
            trace.record("winograd", why)
            return winograd_unit(x, folded, residual, relu)
    out = _conv_bias_act_mkldnn(x, folded, residual, relu)
    if out is not None:
        trace.record("onednn", why)
        return out
    trace.record("vendor+epilogue", f"{x.device.type} {str(x.dtype).replace('torch.', '')}: vendor conv, then the "
                 "fused bias + residual + ReLU kernel")
    return epilogue_unit(x, folded, residual, relu)


class _BnActTrain(torch.autograd.Function):
    """``act(batch_norm(y) + residual)`` with batch statistics: one fused op forward, one backward.

    An autograd.Function over the registered ops rather than a custom op of its own: torch.compile
    traces through both (the ops have fake kernels), and eager calls skip the custom-op
    machinery, which cost ~0.3 ms per call (more than the kernels at small shapes).
    """

    @staticmethod
    def forward(ctx, y, weight, bias, residual, eps: float, relu: bool):
        # Parameters in the statistics' dtype (float32; float64 for float64 y, so gradcheck sees full precision).
        stats_dtype = _stats_dtype(y)
        weight_acc = None if weight is None else weight.to(stats_dtype)
        bias_acc = None if bias is None else bias.to(stats_dtype)
        out, mean, var = _ops.bn_act_train_forward(y, weight_acc, bias_acc, residual, eps, relu)
        ctx.save_for_backward(y, out, mean, var, weight_acc)
        ctx.eps = eps
        ctx.relu = relu
        ctx.has_residual = residual is not None
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        y, out, mean, var, weight = ctx.saved_tensors
        invstd = torch.rsqrt(var + ctx.eps)
        need_residual = ctx.has_residual and ctx.needs_input_grad[3]
        grad_y, grad_weight, grad_bias, grad_residual = _ops.bn_act_backward(
            grad_out.contiguous(memory_format=_memory_format(y)), out, y, mean, invstd, weight, ctx.relu,
            need_residual)
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (
            grad_y,
            None if weight_dtype is None else grad_weight.to(weight_dtype),
            None if bias_dtype is None else grad_bias.to(bias_dtype),
            grad_residual if need_residual else None,
            None,
            None,
        )


def _stats_dtype(y: torch.Tensor) -> torch.dtype:
    """Per-channel statistics are float32, float64 for float64 activations (the kernels' accumulation type)."""
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def bn_act_train(
    y: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
    eps: float,
    residual: Optional[torch.Tensor],
    relu: bool,
) -> torch.Tensor:
    """Training unit: ``act(batch_norm(y) + residual)`` with the running-stat update, as ``nn.BatchNorm2d``."""
    out, mean, var = _BnActTrain.apply(y, weight, bias, residual, eps, relu)
    update_running_stats(running_mean, running_var, mean, var, y.numel() // y.shape[1], momentum)
    return out


def conv_bn_act_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    geometry: ConvGeometry,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
    eps: float,
    residual: Optional[torch.Tensor],
    relu: bool,
) -> torch.Tensor:
    """Training unit from the conv input: the vendor conv, then :func:`bn_act_train`.

    On CPU the conv is oneDNN's or an im2col GEMM, whichever is faster for the shape
    (``resnet_fast.ops.cpu_conv``); elsewhere ``F.conv2d``. Equivalent PyTorch: see
    ``resnet_fast.ops.conv_bn_act_train``.
    """
    if x.device.type == "cpu":
        y = cpu_conv.conv2d(x, weight, conv_bias, geometry)
    else:
        trace.record("vendor+bn_act_train", "vendor conv, then the fused batch-statistics BN + add + ReLU kernels")
        y = reference.conv2d(x, weight, conv_bias, geometry)
    return bn_act_train(y, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual, relu)
