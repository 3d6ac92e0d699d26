"""The content fingerprint behind the fold cache: equal bytes give equal values, any edit changes it."""

from __future__ import annotations

import pytest
import torch

from resnet_fast import ops

pytestmark = pytest.mark.skipif(not ops.content_fingerprint_available(),
                                reason="content_fingerprint needs the compiled extension (resnet_fast._C)")

# Sizes around the kernel's boundaries: 8-word lanes, byte tails, one 256 KiB chunk, the 4 MiB parallel grain.
SIZES = [1, 7, 8, 9, 1000, 65536 + 3, 16 * 65536 * 2 + 5]


def flipped(t: torch.Tensor, index: int, bit: int = 0) -> torch.Tensor:
    """A copy of ``t`` with one bit of element ``index`` flipped."""
    out = t.clone()
    view = out.view(torch.int16 if t.element_size() == 2 else torch.int32).view(-1)
    view[index] ^= 1 << bit
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_equal_bytes_equal_fingerprint_and_any_bit_flip_changes_it(size, dtype):
    t = torch.randn(size, generator=torch.Generator().manual_seed(size)).to(dtype)
    base = ops.content_fingerprint([t])
    assert ops.content_fingerprint([t.clone()]) == base, "a copy with the same bytes must fingerprint the same"
    for index in sorted({0, size // 2, size - 1}):
        for bit in (0, 7, 15):
            assert ops.content_fingerprint([flipped(t, index, bit)]) != base, \
                f"flipping bit {bit} of element {index} of {size} left the fingerprint unchanged"


@pytest.mark.parametrize("size", [64, 65536 * 20])
def test_permutations_change_the_fingerprint(size):
    """A surgery script that reorders filters keeps every value: a plain sum would not see it."""
    t = torch.randn(size, generator=torch.Generator().manual_seed(0))
    base = ops.content_fingerprint([t])
    swapped = t.clone()
    swapped[[1, size - 2]] = swapped[[size - 2, 1]]
    assert ops.content_fingerprint([swapped]) != base, "swapping two elements left the fingerprint unchanged"
    assert ops.content_fingerprint([t.roll(8)]) != base, "rotating by one lane block left it unchanged"
    a, b = t[: size // 2], t[size // 2:]
    assert ops.content_fingerprint([a, b]) != ops.content_fingerprint([b, a]), "tensor order must matter"


def test_layouts_and_views():
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(1))
    channels_last = w.contiguous(memory_format=torch.channels_last)
    assert ops.content_fingerprint([channels_last]) == ops.content_fingerprint([channels_last.clone()])
    sliced = w[:, ::2]  # not dense: fingerprinted through a contiguous copy
    assert ops.content_fingerprint([sliced]) == ops.content_fingerprint([sliced.contiguous()])
    empty = torch.empty(0)
    assert ops.content_fingerprint([empty]) == ops.content_fingerprint([torch.empty(0, 3)])
    assert ops.content_fingerprint([empty]) != ops.content_fingerprint([torch.zeros(1)])
    with torch.inference_mode():
        inference = w.clone()
    assert ops.content_fingerprint([inference]) == ops.content_fingerprint([w])
