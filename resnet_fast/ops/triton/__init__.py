"""The ``triton`` backend: Triton kernels for the fused units (CUDA; CPU only under ``TRITON_INTERPRET=1``).

Files, one per op: :mod:`.conv` (implicit-GEMM NHWC conv with the bias +
residual + ReLU epilogue, and the training variant whose epilogue emits
partial batch statistics), :mod:`.bn_stats` (partial statistics + finalize),
:mod:`.bn_act` (BN + residual + ReLU forward and fused backward), :mod:`.select`
(per-layer choice between our conv and cuDNN's, by measurement).

Outputs of the Triton conv are channels_last whatever the input layout (the
kernel reads NHWC; an NCHW input is converted once). Training outputs follow
the conv output's layout. float64 inputs, and inference units that autograd
must differentiate (eval-mode BN with ``requires_grad`` parameters or inputs),
run the reference PyTorch ops: no Triton kernel of this backend is wrong for
them, they simply have none.

Importing this package never initialises CUDA and never raises when triton is
missing: :func:`unavailable_reason` then says why.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from resnet_fast.ops import reference
from resnet_fast.ops.folding import ConvGeometry, FoldedConv

_IMPORT_ERROR: Optional[str] = None
try:
    import triton
    import triton.language as tl
except Exception as error:  # noqa: BLE001 - any broken install is reported, not raised
    _IMPORT_ERROR = f"triton is not importable ({type(error).__name__}: {error})"

if _IMPORT_ERROR is None:
    try:
        from resnet_fast.ops import update_running_stats
        from resnet_fast.ops.triton import _common, bn_act, bn_stats, conv, select
    except Exception as error:  # noqa: BLE001
        _IMPORT_ERROR = f"the Triton kernels failed to load ({type(error).__name__}: {error})"

__all__ = ["unavailable_reason", "conv_bias_act", "bn_act_train", "conv_bn_act_train"]


def unavailable_reason() -> Optional[str]:
    """None when the Triton kernels can run, else one sentence saying why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not hasattr(torch.library, "custom_op") or not hasattr(torch.library, "register_autograd"):
        return f"torch {torch.__version__} is too old for the triton backend (needs torch >= 2.4)"
    if "input_precision" not in inspect.signature(tl.dot).parameters:
        return f"triton {triton.__version__} is too old for the triton backend (tl.dot has no input_precision)"
    return None


def _kernel_dtype(t: torch.Tensor) -> bool:
    return t.dtype in _common.KERNEL_DTYPES


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _packed_weight(folded: FoldedConv) -> torch.Tensor:
    """The fold's weight in the kernel's layout, packed once per fold (the fold is rebuilt on any change)."""
    packed = folded.packed.get("triton")
    if packed is None or packed.dtype != folded.weight.dtype:
        packed = conv.pack_weight(folded.weight.detach(), folded.geometry.groups)
        if not (hasattr(torch, "compiler") and torch.compiler.is_compiling()):
            folded.packed["triton"] = packed
    return packed


def conv_bias_act(
    x: torch.Tensor,
    folded: FoldedConv,
    residual: Optional[torch.Tensor],
    relu: bool,
) -> torch.Tensor:
    """Inference unit: one Triton kernel for conv + bias + residual + ReLU (or cuDNN conv + Triton
    epilogue where :mod:`.select` measured that faster). Output channels_last.

    Equivalent PyTorch::

        out = F.conv2d(x, folded.weight, folded.bias, stride, padding, dilation, groups)
        out = F.relu(out + residual) if relu else out + residual
    """
    if not _kernel_dtype(x) or _needs_grad(x, folded.weight, folded.bias, residual):
        return reference.conv_bias_act(x, folded, residual, relu)
    geometry = folded.geometry
    packed = _packed_weight(folded)

    def fused() -> torch.Tensor:
        return conv.conv_bias_act(x, packed, folded.bias, residual, geometry.stride, geometry.padding,
                                  geometry.dilation, relu)

    def vendor() -> torch.Tensor:
        y = reference.conv2d(x, folded.weight, None, geometry)
        return bn_act.bias_act(y, folded.bias, residual, relu)

    key = select.layer_key("infer", x, folded.weight, geometry, residual is not None, relu)
    chosen = select.choose(key, {"triton": fused, "vendor": vendor}, x.device)
    return fused() if chosen == "triton" else vendor()


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
    """Training unit on a conv output: Triton batch statistics, then one fused BN + residual + ReLU pass
    (fused backward); running stats updated in place as ``nn.BatchNorm2d`` (skipped when None).

    Equivalent PyTorch::

        out = F.batch_norm(y, running_mean, running_var, weight, bias, training=True, momentum=momentum, eps=eps)
        out = F.relu(out + residual) if relu else out + residual
    """
    if not _kernel_dtype(y):
        return reference.bn_act_train(y, weight, bias, running_mean, running_var, momentum, eps, residual, relu)
    mean, var = bn_stats.batch_stats(y)
    update_running_stats(running_mean, running_var, mean, var, y.numel() // y.shape[1], momentum)
    return bn_act.bn_act(y, mean, var, weight, bias, residual, eps, relu)


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
    """Training unit from the conv input: the Triton conv emits batch statistics from its epilogue
    (or cuDNN conv + a statistics pass where measured faster), then the fused BN + residual + ReLU.
    Conv backward is ``aten.convolution_backward`` (cuDNN / oneDNN).

    Equivalent PyTorch::

        y = F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups)
        out = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps)
        out = F.relu(out + residual) if relu else out + residual
    """
    if not _kernel_dtype(x):
        y = reference.conv2d(x, weight, conv_bias, geometry)
        return reference.bn_act_train(y, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual,
                                      relu)

    def fused():
        return conv.conv_stats(x, weight, conv_bias, geometry.stride, geometry.padding, geometry.dilation,
                               geometry.groups)

    def vendor():
        y = reference.conv2d(x, weight, conv_bias, geometry)
        return (y, *bn_stats.batch_stats(y))

    # Both candidates are side-effect free (the running stats are updated below), so timing may rerun them;
    # their backward is the same (cuDNN conv backward + our BN backward), so forward time decides.
    key = select.layer_key("train", x, weight, geometry, residual is not None, relu)
    chosen = select.choose(key, {"triton": fused, "vendor": vendor}, x.device)
    y, mean, var = fused() if chosen == "triton" else vendor()
    count = y.numel() // y.shape[1]
    update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return bn_act.bn_act(y, mean, var, bn_weight, bn_bias, residual, eps, relu)
