"""Shared helpers of the Triton kernels: op registration, launches, output allocation, layouts.

Nothing here initialises CUDA; ``triton`` itself is imported by the kernel files only.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from resnet_fast import settings

#: Tests set this to fill every output a host function allocates with NaN before
#: its kernel runs, so an element the kernel forgets to write fails the comparison.
POISON_OUTPUTS = False

#: ``torch.library.triton_op`` / ``wrap_triton`` exist from torch 2.6; before that
#: the ops are opaque ``custom_op``s with hand-written fake kernels.
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")

#: float64 has no tensor-core path and the reference is float64: it stays with PyTorch.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return settings.triton_interpreted()


def conv_allows_tf32() -> bool:
    """Whether fp32 convolutions may use TF32: the setting cuDNN's convolutions follow.

    The fused Triton conv and the cuDNN candidate it races against must compute in
    the same precision. ``torch.backends.cudnn.conv.fp32_precision`` (torch >= 2.9)
    is read first, walking up to the cudnn and global settings while it says
    ``"none"`` (inherit): reading the legacy ``allow_tf32`` flag after a user set the
    new API raises there. Older torch has only the legacy flag.

    Equivalent PyTorch (torch >= 2.9, no inheritance)::

        torch.backends.cudnn.conv.fp32_precision == "tf32"
    """
    levels = (getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn, torch.backends)
    try:
        for level in levels:
            precision = getattr(level, "fp32_precision", None) if level is not None else None
            if precision is None:
                raise AttributeError("fp32_precision")
            if precision != "none":
                return precision == "tf32"
        return False
    except (AttributeError, RuntimeError):
        return bool(torch.backends.cudnn.allow_tf32)


def define_op(name: str, fake: Optional[Callable] = None) -> Callable[[Callable], Any]:
    """Register ``resnet_fast::<name>`` backed by Triton kernels.

    ``triton_op`` makes the kernels visible to ``torch.compile`` (the body is its own
    fake kernel); on older torch the body is an opaque ``custom_op`` and ``fake``
    supplies the meta kernel.
    """

    def decorate(fn: Callable) -> Any:
        qualified = f"resnet_fast::{name}"
        if HAS_TRITON_OP:
            return torch.library.triton_op(qualified, fn, mutates_args=())
        op = torch.library.custom_op(qualified, fn, mutates_args=())
        if fake is not None:
            op.register_fake(fake)
        return op

    return decorate


def _interpreted_kernel(kernel: Any) -> bool:
    """Whether ``kernel`` (or the kernel an autotuner or heuristics wraps) was decorated under ``TRITON_INTERPRET=1``."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.interpreter import InterpretedFunction

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def launcher(kernel: Any) -> Any:
    """``wrap_triton(kernel)`` where it exists, so tracing sees the launch; the kernel itself otherwise.

    An interpreted kernel launches as it is: ``wrap_triton`` rejects it before torch 2.14
    ("only works on functions annotated with triton.jit"), and returns it unwrapped from 2.14 on.
    """
    if HAS_TRITON_OP and not _interpreted_kernel(kernel):
        return torch.library.wrap_triton(kernel)
    return kernel


#: Pixel rows (N * H * W) index the kernels' tiles in int32 (image offsets are int64): cheap
#: 32-bit division per element, and a tile's last row must not wrap.
MAX_ROWS = 2**31 - 2**16


def check_rows(rows: int) -> None:
    """Raise when ``rows`` pixels (N * H * W) are too many for the kernels' int32 row index."""
    if rows > MAX_ROWS:
        raise ValueError(f"the Triton kernels index N * H * W = {rows} pixels in int32 (at most {MAX_ROWS}); "
                         f"split the batch")


def empty_output(shape, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``torch.empty`` for a kernel output (NaN-filled when :data:`POISON_OUTPUTS` is set)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def empty_output_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` (same memory format) for a kernel output, NaN-filled when poisoning."""
    out = torch.empty_like(t)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last when ``t`` is stored NHWC (and not also plain contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def flat_pixel_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (N, C, H, W) with H and W collapsible into one pixel index, and its (n, pixel, c) strides.

    Both NCHW-contiguous and channels_last tensors qualify as they are; anything
    else is copied to contiguous first. The element-wise kernels index
    ``n * stride_n + p * stride_p + c * stride_c`` with ``p = h * W + w``.
    """
    height, width = t.shape[2], t.shape[3]
    if width == 1:
        return t, (t.stride(0), t.stride(2), t.stride(1))
    if height > 1 and t.stride(2) != width * t.stride(3):
        t = t.contiguous()
    return t, (t.stride(0), t.stride(3), t.stride(1))


def interpreter_block(size: int, largest: int = 1024) -> int:
    """A row-block size for the interpreter, whose cost is per program and per ``tl`` call rather than
    per element: half the rows (so tiny test shapes still span two blocks and a masked edge), 16..largest."""
    half = 1 << max(0, (max(size, 1) - 1).bit_length() - 1)
    return max(16, min(largest, half))


def interpreter_channels(channels: int, largest: int = 512) -> int:
    """A channel-block size for the interpreter: all channels in one block (16..largest)."""
    return max(16, min(largest, 1 << max(0, (max(channels, 1) - 1).bit_length())))
