"""The kernels of one ISA variant, run by tests/test_cpu_isa_variants.py in a subprocess with
``RESNET_FAST_CPU_ISA`` forced (the variant is chosen once per process). Not collected on its own
(not a test_*.py file); ``RESNET_FAST_CPU_ISA=avx512 pytest tests/cpu_isa_variant_checks.py`` runs it by hand.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from resnet_fast import _extension

if _extension.extension() is None:
    pytest.skip(f"extension not built: {_extension.load_error()}", allow_module_level=True)

ISA_VAR = "RESNET_FAST_CPU_ISA"
INFO = _extension.build_info()
PANEL_COLUMNS = {"avx2": 16, "avx512": 32}
ops = torch.ops.resnet_fast



def _variant() -> str:
    variant = os.environ.get(ISA_VAR, "")
    if variant not in PANEL_COLUMNS:
        pytest.skip(f"set {ISA_VAR} to avx2 or avx512 to run one variant's checks")
    return variant


def test_runs_the_requested_variant():
    assert INFO["cpu_isa_active"] == _variant(), INFO
    assert INFO["winograd_panel_columns"] == PANEL_COLUMNS[_variant()]


# (N, C_in, C_out, H, W): C_out below, between and above whole 16- and 32-column panels; 1x1 images;
# batch 1; C_in not a multiple of 8 or 16 (vector tails of the input transform).
WINOGRAD_SHAPES = [(1, 3, 13, 7, 9), (3, 13, 20, 9, 7), (1, 5, 3, 1, 1), (2, 8, 33, 2, 5), (1, 37, 70, 6, 5),
                   (2, 24, 48, 11, 3)]
WINOGRAD_IDS = ["1x3-13x7x9", "3x13-20x9x7", "1x5-3x1x1", "2x8-33x2x5", "1x37-70x6x5", "2x24-48x11x3"]
# Whole 8-channel blocks, not whole 16- or 32-channel vectors and panels.
BLOCKED_SHAPES = [(1, 8, 24, 5, 7), (2, 24, 40, 3, 4), (1, 16, 8, 1, 1), (3, 40, 56, 6, 5), (1, 72, 32, 2, 2)]
BLOCKED_IDS = ["1x8-24x5x7", "2x24-40x3x4", "1x16-8x1x1", "3x40-56x6x5", "1x72-32x2x2"]
EPILOGUES = [(True, True), (False, False)]
EPILOGUE_IDS = ["res-relu", "plain"]


@pytest.mark.parametrize("shape", WINOGRAD_SHAPES, ids=WINOGRAD_IDS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("with_residual,relu", EPILOGUES, ids=EPILOGUE_IDS)
def test_winograd_conv3x3(shape, layout, with_residual, relu):
    from tests.numerics import assert_tolerance, poison_allocator
    from tests.test_winograd import _expected, _problem

    (x, weight, bias, residual), (x64, weight64, bias64, residual64) = _problem(shape, layout, seed=11)
    if not with_residual:
        residual = residual64 = None
    packed = ops.winograd_weight(weight)
    assert packed.shape[-1] == PANEL_COLUMNS[_variant()]
    poison_allocator(torch.empty(shape[0], shape[2], shape[3], shape[4]))
    out = ops.winograd_conv3x3(x, packed, bias, residual, relu)
    assert_tolerance(out, _expected(x64, weight64, bias64, residual64, relu),
                     _expected(x, weight, bias, residual, relu), f"winograd_conv3x3 {shape} ({_variant()})")


@pytest.mark.parametrize("shape", BLOCKED_SHAPES, ids=BLOCKED_IDS)
@pytest.mark.parametrize("with_residual,relu", EPILOGUES + [(True, False)], ids=EPILOGUE_IDS + ["res"])
def test_winograd_conv3x3_blocked(shape, with_residual, relu):
    from resnet_fast.ops.blocked import from_blocked, to_blocked
    from tests.numerics import assert_tolerance, poison_allocator
    from tests.test_winograd import _expected, _problem

    (x, weight, bias, residual), (x64, weight64, bias64, residual64) = _problem(shape, "nchw", seed=12)
    if not with_residual:
        residual = residual64 = None
    poison_allocator(to_blocked(torch.empty(shape[0], shape[2], shape[3], shape[4])))
    out = ops.winograd_conv3x3_blocked(to_blocked(x), ops.winograd_weight(weight), bias,
                                       None if residual is None else to_blocked(residual), relu)
    assert out.shape == (shape[0], shape[2] // 8, shape[3], shape[4], 8)
    assert_tolerance(from_blocked(out), _expected(x64, weight64, bias64, residual64, relu),
                     _expected(x, weight, bias, residual, relu), f"winograd_conv3x3_blocked {shape} ({_variant()})")


def test_winograd_rejects_another_variants_packing():
    from tests.test_winograd import _problem

    (x, weight, bias, _), _ = _problem((1, 6, 20, 4, 4), "cl")
    packed = ops.winograd_weight(weight)
    other = 48 - packed.shape[-1]  # the other variant's panel width (16 <-> 32)
    foreign = torch.zeros(16, -(-20 // other), 6, other)
    with pytest.raises(RuntimeError, match=r"packed_weight must come from winograd_weight for 6 input channels"):
        ops.winograd_conv3x3(x, foreign, bias, None, True)


def test_winograd_results_do_not_depend_on_thread_count():
    from tests.test_winograd import _problem

    (x, weight, bias, residual), _ = _problem((2, 24, 40, 11, 13), "cl", seed=13)
    packed = ops.winograd_weight(weight)
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outputs.append(ops.winograd_conv3x3(x, packed, bias, residual, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:]), "thread count changed the bits"


# bn_act: channel counts that leave 16-lane tails, 1x1 images, batch 1.
BN_SHAPES = [(1, 37, 5, 3), (3, 13, 9, 7), (2, 40, 1, 1), (1, 19, 17, 19)]
BN_IDS = ["1x37x5x3", "3x13x9x7", "2x40x1x1", "1x19x17x19"]
BN_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("dtype", BN_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=BN_IDS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_bn_act(dtype, shape, layout):
    """bn_act_forward, batch_stats, bn_act_train_forward and bn_act_backward of the forced variant."""
    from tests.test_extension_kernels import _check_backward, _check_batch_stats, _check_forward, _check_train_forward

    torch.manual_seed(zlib.crc32(repr((dtype, shape, layout)).encode()))
    other = "cl" if layout == "nchw" else "nchw"
    _check_forward("cpu", dtype, shape, layout, other, True, True, True)
    _check_forward("cpu", dtype, shape, layout, layout, False, False, False)
    _check_batch_stats("cpu", dtype, shape, layout, 100.0)
    _check_train_forward("cpu", dtype, shape, layout, True, True, True)
    _check_train_forward("cpu", dtype, shape, layout, False, False, False)
    _check_backward("cpu", dtype, shape, layout, True, True, True)
    _check_backward("cpu", dtype, shape, layout, False, False, False)
