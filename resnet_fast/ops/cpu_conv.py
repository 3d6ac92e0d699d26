"""The convolution of the CPU training unit: oneDNN's, or one GEMM over im2col columns.

oneDNN's direct convolution is the right choice for most layers, but deep layers of small
images (few output pixels, hundreds of channels: ResNet-18's last stage on 64x64 inputs has
2x2 outputs and 512 channels) make its forward + backward poorly shaped for the cores; there
``unfold -> one matrix multiply`` (MKL/oneDNN GEMM, with autograd's fold/GEMM backward) is
up to 2.7x faster on this AVX2 machine (``benchmarks/NOTES.md``). Which one wins depends on
the CPU and the shape, so it is measured once per shape (forward + backward of both, a few
milliseconds) and remembered for the process.

``RESNET_FAST_CPU_CONV=onednn|gemm`` forces one algorithm (``auto``, the default, measures).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from resnet_fast import settings
from resnet_fast.ops import conv_output_shape, trace
from resnet_fast.ops.folding import ConvGeometry

ALGORITHMS = ("onednn", "gemm")
# im2col columns above this size are never worth materialising (and would cost memory).
MAX_COLUMN_BYTES = 32 << 20
TIMED_RUNS = 3

_choices: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}


def onednn_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  geometry: ConvGeometry) -> torch.Tensor:
    """PyTorch's convolution (oneDNN on CPU)."""
    return F.conv2d(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)


def gemm_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                geometry: ConvGeometry) -> torch.Tensor:
    """Convolution (groups 1) as im2col columns times the weight matrix, in one GEMM.

    Equivalent PyTorch: ``F.conv2d(x, weight, bias, stride, padding, dilation)``. The columns are
    laid out (N*Ho*Wo, C*kh*kw) so the GEMM's (N*Ho*Wo, O) result is already a channels_last
    (N, O, Ho, Wo) tensor: no copy after the multiply.
    """
    if geometry.groups != 1:
        raise ValueError(f"gemm_conv2d handles groups=1 only, got groups={geometry.groups}")
    batch, out_channels = x.shape[0], weight.shape[0]
    kernel = tuple(weight.shape[-2:])
    columns = F.unfold(x, kernel, dilation=geometry.dilation, padding=geometry.padding, stride=geometry.stride)
    _, _, out_h, out_w = conv_output_shape(x, weight, geometry)
    rows = columns.transpose(1, 2).reshape(batch * out_h * out_w, columns.shape[1])
    matrix = weight.reshape(out_channels, -1).t()
    out = rows @ matrix if bias is None else torch.addmm(bias, rows, matrix)
    return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)


def _gemm_eligible(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry) -> bool:
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() == 4 and geometry.groups == 1):
        return False
    _, _, out_h, out_w = conv_output_shape(x, weight, geometry)
    column_bytes = x.shape[0] * out_h * out_w * weight[0].numel() * x.element_size()
    return out_h > 0 and out_w > 0 and column_bytes <= MAX_COLUMN_BYTES


def _forced_algorithm() -> Optional[str]:
    value = settings.value("cpu_conv")
    return None if value == "auto" else value


def _seconds_per_step(conv: Callable, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      geometry: ConvGeometry, grad_out: torch.Tensor) -> float:
    """Best of TIMED_RUNS forward + backward passes (after one untimed) on copies.

    Copies made outside inference mode: a model in train mode may first run under it, and its
    inference tensors can take no part in a backward."""
    best = float("inf")
    with torch.inference_mode(False), torch.enable_grad():
        x, weight, grad_out = (t.clone() if t.is_inference() else t for t in (x, weight, grad_out))
        bias = bias.clone() if bias is not None and bias.is_inference() else bias
        for run in range(TIMED_RUNS + 1):
            inputs = [x.detach().requires_grad_(x.requires_grad), weight.detach().requires_grad_()]
            inputs.append(None if bias is None else bias.detach().requires_grad_())
            start = time.perf_counter()
            conv(*inputs, geometry).backward(grad_out)
            if run:
                best = min(best, time.perf_counter() - start)
    return best


def _key(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], geometry: ConvGeometry) -> tuple:
    return (tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last), x.requires_grad,
            tuple(weight.shape), bias is not None, tuple(geometry.stride), tuple(geometry.padding),
            tuple(geometry.dilation), geometry.groups, torch.get_num_threads())


def choose_algorithm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     geometry: ConvGeometry) -> str:
    """``"onednn"`` or ``"gemm"`` for this convolution shape: forced, cached, or measured now."""
    if not _gemm_eligible(x, weight, geometry):
        return "onednn"
    forced = _forced_algorithm()
    if forced is not None:
        return forced
    if torch.compiler.is_compiling():
        return "onednn"
    key = _key(x, weight, bias, geometry)
    if key not in _choices:
        with torch.no_grad():
            out = onednn_conv2d(x, weight, bias, geometry)
        # A private generator: measuring must not advance the global RNG (bitwise-resumable training).
        generator = torch.Generator(device=x.device).manual_seed(0)
        grad_out = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        timings = {name: _seconds_per_step(conv, x, weight, bias, geometry, grad_out)
                   for name, conv in (("onednn", onednn_conv2d), ("gemm", gemm_conv2d))}
        _choices[key] = min(timings, key=timings.get)
        _timings[key] = timings
    return _choices[key]


def _why(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], geometry: ConvGeometry,
         algorithm: str) -> str:
    if not _gemm_eligible(x, weight, geometry):
        return "rule: oneDNN conv (im2col GEMM not eligible for this shape), then the fused BN-train kernels"
    if _forced_algorithm() is not None:
        return f"RESNET_FAST_CPU_CONV={algorithm}, then the fused BN-train kernels"
    timings = _timings.get(_key(x, weight, bias, geometry))
    if timings is None:
        return f"rule: {algorithm} (nothing is timed while torch.compile traces)"
    others = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in timings.items())
    return f"measured forward + backward: {others}; then the fused BN-train kernels"


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], geometry: ConvGeometry) -> torch.Tensor:
    """``F.conv2d`` for the CPU training unit, by the faster algorithm for this shape (see module doc)."""
    algorithm = choose_algorithm(x, weight, bias, geometry)
    if trace.recording_open():
        trace.record(f"{algorithm}+bn_act_train", _why(x, weight, bias, geometry, algorithm))
    if algorithm == "gemm":
        return gemm_conv2d(x, weight, bias, geometry)
    return onednn_conv2d(x, weight, bias, geometry)
