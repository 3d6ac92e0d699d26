"""The CPU Winograd F(2x2, 3x3) convolution (``winograd_weight`` / ``winograd_conv3x3``) against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_fast import _extension
from tests.numerics import assert_tolerance, poison_allocator

if _extension.extension() is None:
    pytest.skip(f"extension not built: {_extension.load_error()}", allow_module_level=True)

from resnet_fast.ops import cpu_select, trace  # noqa: E402
from resnet_fast.ops import extension as ext  # noqa: E402
from resnet_fast.ops.folding import ConvGeometry, FoldedConv  # noqa: E402

ops = torch.ops.resnet_fast
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}

# (N, C_in, C_out, H, W): odd channel counts (vector tails, a partial 16-channel panel), odd and
# non-square images (partial 2x2 tiles), 1x1 images, and a ResNet stage shape.
SHAPES = [(1, 3, 13, 7, 9), (3, 13, 20, 9, 7), (2, 16, 16, 8, 8), (1, 5, 3, 1, 1), (2, 8, 33, 2, 5),
          (1, 64, 64, 14, 14)]
SHAPE_IDS = ["1x3-13x7x9", "3x13-20x9x7", "2x16-16x8x8", "1x5-3x1x1", "2x8-33x2x5", "1x64-64x14x14"]


def _problem(shape, layout, seed=0):
    """float32 input, weight, bias, residual (exactly representable) and their float64 twins."""
    n, c_in, c_out, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64).float().double()
    weight64 = (torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=torch.float64) / (9 * c_in) ** 0.5).float().double()
    bias64 = torch.randn(c_out, generator=gen, dtype=torch.float64).float().double()
    residual64 = torch.randn(n, c_out, h, w, generator=gen, dtype=torch.float64).float().double()
    fmt = LAYOUTS[layout]
    return (x64.float().contiguous(memory_format=fmt), weight64.float(), bias64.float(),
            residual64.float().contiguous(memory_format=fmt)), (x64, weight64, bias64, residual64)


def _expected(x, weight, bias, residual, relu):
    out = F.conv2d(x, weight, bias, padding=1)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_residual,relu", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["res-relu", "relu", "res", "plain"])
def test_winograd_conv3x3_matches_float64(shape, layout, with_residual, relu):
    (x, weight, bias, residual), (x64, weight64, bias64, residual64) = _problem(shape, layout)
    if not with_residual:
        residual = residual64 = None
    packed = ops.winograd_weight(weight)
    poison_allocator(torch.empty(shape[0], shape[2], shape[3], shape[4]))
    out = ops.winograd_conv3x3(x, packed, bias, residual, relu)
    assert out.is_contiguous(memory_format=torch.channels_last), "output must be channels_last"
    assert_tolerance(out, _expected(x64, weight64, bias64, residual64, relu),
                     _expected(x, weight, bias, residual, relu), f"winograd_conv3x3 {shape}")


@pytest.mark.parametrize("shape", [(2, 24, 40, 11, 13), (1, 24, 40, 3, 3)], ids=["tile-chunks", "channel-splits"])
def test_winograd_results_do_not_depend_on_thread_count(shape):
    """Tiles (or, for few tiles, output channels) are split differently per thread count; each
    output's arithmetic must not change."""
    (x, weight, bias, residual), _ = _problem(shape, "cl", seed=1)
    packed = ops.winograd_weight(weight)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outputs.append(ops.winograd_conv3x3(x, packed, bias, residual, True))
    finally:
        torch.set_num_threads(threads)
    for count, out in zip((2, 3), outputs[1:]):
        assert torch.equal(out, outputs[0]), f"{count} threads gave different bits than 1 thread"


def test_winograd_relu_propagates_nan_like_torch():
    (x, weight, bias, _), _ = _problem((1, 4, 4, 4, 4), "nchw")
    x[0, 0, 1, 1] = float("nan")
    out = ops.winograd_conv3x3(x, ops.winograd_weight(weight), bias, None, True)
    expected = torch.relu(F.conv2d(x, weight, bias, padding=1))
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), "NaN positions differ from torch.relu(conv2d)"


def test_winograd_opcheck():
    (x, weight, bias, residual), _ = _problem((2, 5, 7, 6, 5), "cl")
    torch.library.opcheck(ops.winograd_weight, (weight,))
    torch.library.opcheck(ops.winograd_conv3x3, (x, ops.winograd_weight(weight), bias, residual, True))


def test_winograd_bad_inputs_raise_clear_errors():
    (x, weight, bias, residual), _ = _problem((1, 4, 6, 5, 5), "nchw")
    packed = ops.winograd_weight(weight)
    with pytest.raises(RuntimeError, match=r"winograd_weight: weight must be \(K, C, 3, 3\)"):
        ops.winograd_weight(torch.randn(6, 4, 5, 5))
    with pytest.raises(RuntimeError, match=r"x must be a float32 CPU tensor, got Double"):
        ops.winograd_conv3x3(x.double(), packed, bias, None, True)
    with pytest.raises(RuntimeError, match=r"x must be 4-d"):
        ops.winograd_conv3x3(x[0], packed, bias, None, True)
    with pytest.raises(RuntimeError, match=r"packed_weight must come from winograd_weight for 3 input channels"):
        ops.winograd_conv3x3(x[:, :3], packed, bias, None, True)
    with pytest.raises(RuntimeError, match=r"bias must have one value per output channel"):
        ops.winograd_conv3x3(x, packed, torch.randn(40), None, True)
    with pytest.raises(RuntimeError, match=r"residual shape .* does not match the output shape"):
        ops.winograd_conv3x3(x, packed, bias, residual[:, :3], True)
    with pytest.raises(RuntimeError, match=r"residual must be a float32 CPU tensor, got BFloat16"):
        ops.winograd_conv3x3(x, packed, bias, residual.bfloat16(), True)


# ------------------------------------------------------------------------------------------
# the inference unit's choice of algorithm

def _folded(c_in=8, c_out=12, stride=1):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen) / (9 * c_in) ** 0.5
    return FoldedConv(weight, torch.randn(c_out, generator=gen), ConvGeometry((stride, stride), (1, 1), (1, 1), 1))


@pytest.mark.parametrize("algorithm", ["winograd", "onednn"])
def test_conv_bias_act_runs_the_chosen_3x3_algorithm(algorithm, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_CONV3X3", algorithm)
    folded = _folded()
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad():
        out = ext.conv_bias_act(x, folded, None, True)
    assert ("winograd" in folded.packed) == (algorithm == "winograd"), f"packed forms: {sorted(folded.packed)}"
    torch.testing.assert_close(out, torch.relu(F.conv2d(x, folded.weight, folded.bias, padding=1)))


def test_winograd_is_not_used_for_strided_or_float64_convs(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_CONV3X3", "winograd")
    strided = _folded(stride=2)
    with torch.no_grad():
        ext.conv_bias_act(torch.randn(1, 8, 9, 9), strided, None, True)
        double = FoldedConv(strided.weight.double(), strided.bias.double(), ConvGeometry((1, 1), (1, 1), (1, 1), 1))
        ext.conv_bias_act(torch.randn(1, 8, 9, 9, dtype=torch.float64), double, None, True)
    assert "winograd" not in strided.packed and "winograd" not in double.packed


def test_winograd_weight_cache_follows_in_place_weight_edits(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_CONV3X3", "winograd")
    folded = _folded()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        ext.conv_bias_act(x, folded, None, False)
        folded.weight.mul_(2)
        out = ext.conv_bias_act(x, folded, None, False)
    torch.testing.assert_close(out, F.conv2d(x, folded.weight, folded.bias, padding=1))


def test_conv3x3_algorithm_setting_is_validated(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_CONV3X3", "fft")
    with pytest.raises(ValueError, match="RESNET_FAST_CPU_CONV3X3 must be one of auto, winograd, onednn; got 'fft'"):
        ext.choose_conv3x3(torch.randn(1, 8, 6, 6), _folded(), None, True)


@pytest.mark.parametrize("faster", ["winograd", "onednn"])
def test_auto_runs_the_kernel_measured_faster(faster, monkeypatch):
    """``auto`` follows the measured times, whatever the ISA: no rule picks a kernel for a CPU."""
    monkeypatch.delenv("RESNET_FAST_CPU_CONV3X3", raising=False)
    timed = []

    def fake_seconds(key, run):
        timed.append(key.split()[0])
        run()  # the candidate must run: it is what is being timed
        return 1.0 if key.startswith(faster) else 2.0

    monkeypatch.setattr(cpu_select, "seconds", fake_seconds)
    folded, x = _folded(), torch.randn(2, 8, 9, 10)
    kernel, why = ext.choose_conv3x3(x, folded, None, True)
    assert (kernel, sorted(timed)) == (faster, ["onednn", "winograd"]), (kernel, timed, why)
    assert why.startswith(f"measured: {faster} 1000.00 ms"), why
    with torch.no_grad(), trace.recording() as ran:
        out = ext.conv_bias_act(x, folded, None, True)
    assert [kernel for kernel, _ in ran] == [faster], ran
    torch.testing.assert_close(out, torch.relu(F.conv2d(x, folded.weight, folded.bias, padding=1)))
    monkeypatch.setenv("RESNET_FAST_CPU_CONV3X3", "onednn" if faster == "winograd" else "winograd")
    forced, why = ext.choose_conv3x3(x, folded, None, True)
    assert forced != faster and why.startswith("RESNET_FAST_CPU_CONV3X3="), "an explicit setting must win"
