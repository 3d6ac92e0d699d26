"""Round-to-nearest-even float32 -> bfloat16 for the Triton interpreter.

On a GPU ``x.to(tl.bfloat16)`` rounds to nearest even. Triton's CPU interpreter
truncates instead (even with ``fp_downcast_rounding="rtne"``; seen with triton
3.8), which doubles the bf16 output error and would fail the tolerance rule for
reasons that have nothing to do with the kernels. Kernels apply this helper
before the cast under a constexpr flag set only when interpreted, so GPU code is
unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16_grid(x):
    """``x`` (float32) rounded to the nearest bfloat16 value (ties to even), still as float32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = bits & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
