"""The CUDA kernels of csrc/cuda/bn_act_kernels.cu, run on the CPU: their twin.

The kernel file is compiled with g++ against csrc/cuda/host_shim.h (tests/cuda_twin.py), and its
real launchers run on torch tensors: results against float64 references under the project's
tolerance rule (tests/numerics.py), with outputs and workspaces poisoned (NaN) beforehand and
guard elements after every output, in both layouts, on aligned and misaligned pointers (the
16-byte pack path and the scalar one; the launch log says which ran), for device sizes that give
one and many reduction splits. The same cases run again under AddressSanitizer + UBSan in a
subprocess (test_sanitizers_find_nothing; RESNET_FAST_TWIN_SANITIZED=1 marks that run).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests import cuda_twin
from tests.cuda_twin import Shape, Twin
from tests.numerics import assert_tolerance

if cuda_twin.compiler() is None:
    pytest.skip("g++ not found: the CPU twin of the CUDA kernels is compiled with it", allow_module_level=True)

SANITIZED = os.environ.get("RESNET_FAST_TWIN_SANITIZED") == "1"

STREAM = 0x5EED  # a fake cudaStream_t: every launch must carry the caller's stream
GUARD = 16  # elements after each output that no kernel may write
SENTINEL = 12288.0  # what the guards hold (exact in every dtype)
EPS = 1e-5

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = {"nchw": False, "cl": True}


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


@pytest.fixture(scope="module")
def twin() -> Twin:
    library = os.environ.get("RESNET_FAST_TWIN_LIBRARY")
    return Twin(Path(library) if library else cuda_twin.build("plain"))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The references are tiny: torch's thread pool only adds wake-up latency on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_device(twin):
    twin.reset()
    yield
    twin.reset()


# ------------------------------------------------------------------------------------------
# tensors at chosen addresses, poisoned outputs, guards


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _strides(shape, channels_last: bool):
    n, c, h, w = shape
    return (c * h * w, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)


class Placed:
    """A tensor inside a flat allocation, ``offset`` elements from its (64-byte aligned) start and
    followed by ``guard`` sentinel elements, so misaligned bases and stray writes can be arranged."""

    def __init__(self, values: torch.Tensor, channels_last: bool = False, offset: int = 0, guard: int = 0,
                 sentinel: float = SENTINEL):
        numel = values.numel()
        self.sentinel = sentinel
        self.flat = torch.full((offset + numel + guard,), sentinel, dtype=values.dtype)
        self.begin, self.end = offset, offset + numel
        if values.dim() == 4:
            self.tensor = self.flat[offset:].as_strided(values.shape, _strides(values.shape, channels_last))
        else:
            self.tensor = self.flat[offset:offset + numel].view(values.shape)
        self.tensor.copy_(values)

    def check_guards(self, name: str):
        for part, where in ((self.flat[:self.begin], "before"), (self.flat[self.end:], "after")):
            bad = (part != self.sentinel).nonzero().flatten()
            assert bad.numel() == 0, (f"{name}: {bad.numel()} elements written {where} the tensor "
                                      f"(first at flat index {int(bad[0]) + (0 if where == 'before' else self.end)})")


def _placed_input(values: torch.Tensor, channels_last: bool, offset: int) -> torch.Tensor:
    # No trailing guard on inputs: under AddressSanitizer a read past the end is then a report.
    return Placed(values, channels_last, offset).tensor


def _poisoned(shape, dtype, channels_last=False, offset=0) -> Placed:
    return Placed(torch.full(shape, float("nan"), dtype=dtype), channels_last, offset, GUARD)


def _poisoned_workspace(nbytes: int) -> Placed:
    return Placed(torch.full((nbytes,), 0xFF, dtype=torch.uint8), guard=GUARD * 8, sentinel=0xA5)  # 0xff..: NaN


def _activation(shape, dtype, offset=0.0):
    """Random activations exactly representable in ``dtype``, and their float64 twin."""
    t = (torch.randn(shape, dtype=torch.float64) * 1.5 + offset).to(dtype)
    return t, t.double()


def _channel_vector(channels, acc, positive=False):
    v = torch.randn(channels, dtype=torch.float64)
    v = v.abs() + 0.5 if positive else v
    v = v.float().double()
    return v.to(acc), v


def _view(v):
    return v.view(1, -1, 1, 1)


def _wide(dtype: torch.dtype) -> int:
    return 16 // torch.empty(0, dtype=dtype).element_size()


def _expected_pack(dtype, shape, channels_last: bool, *tensors) -> int:
    """The pack width pack_width() in bn_act_kernels.cu must pick: 16 bytes when a pack stays in one
    row (channels_last) or plane (NCHW) and every pointer is 16-byte aligned, else 1."""
    n, c, h, w = shape
    run = c if channels_last else h * w
    aligned = all(t is None or t.data_ptr() % 16 == 0 for t in tensors)
    return _wide(dtype) if run % _wide(dtype) == 0 and aligned else 1


def _kernel(twin: Twin, prefix: str):
    found = [launch for launch in twin.launches() if prefix in launch.kernel]
    assert len(found) == 1, f"expected one launch of {prefix}, got: {[l.kernel for l in twin.launches()]}"
    launch = found[0]
    assert launch.stream == STREAM, f"{launch.kernel} ran on stream {launch.stream:#x}, not the caller's {STREAM:#x}"
    return launch


def _cpp_bool(value: bool) -> str:
    return "true" if value else "false"


# ------------------------------------------------------------------------------------------
# the shim itself: launch checks, barriers, shared memory, conversions


@pytest.mark.parametrize("grid,block,ok", [
    ((1, 1, 1), (1, 1, 1), True),
    ((3, 2, 2), (32, 8, 1), True),
    ((1, 1, 1), (1024, 1, 1), True),
    ((1, 65535, 1), (1, 1, 1), True),
    ((0, 1, 1), (256, 1, 1), False),
    ((4, 0, 1), (32, 8, 1), False),
    ((1, 1, 1), (0, 8, 1), False),
    ((1, 65536, 1), (32, 8, 1), False),
    ((1, 1, 65536), (1, 1, 1), False),
    ((1, 1, 1), (1025, 1, 1), False),
    ((1, 1, 1), (32, 33, 1), False),
    ((1, 1, 1), (1, 1, 65), False),
], ids=lambda v: _id(v) if isinstance(v, tuple) else ("ok" if v else "rejected"))
def test_shim_launch_checks_configuration_like_cuda(twin, grid, block, ok):
    error, threads, outside = twin.probe_launch(grid, block)
    if ok:
        assert error == 0, twin.lib.twin_error_string(error).decode()
        assert threads == math.prod(grid) * math.prod(block) and outside == 0
    else:
        assert error == cuda_twin.CUDA_ERROR_INVALID_CONFIGURATION, f"grid {grid} block {block}: error {error}"
        assert threads == 0, "a rejected launch must not run"
    assert twin.take_error()[0] == 0, "cudaGetLastError must reset the error"


@pytest.mark.parametrize("schedule", [cuda_twin.SCHEDULE_ASCENDING, cuda_twin.SCHEDULE_DESCENDING,
                                      cuda_twin.SCHEDULE_SHUFFLED], ids=["ascending", "descending", "shuffled"])
def test_shim_syncthreads_is_a_barrier_and_shared_memory_starts_poisoned(twin, schedule):
    assert twin.shared_regions > 0, "no __shared__ arrays found in the twin library (nm)"
    twin.set_schedule(schedule, seed=3)
    error, out = twin.probe_barrier(blocks=3, diverge=False)
    assert error == 0, twin.lib.twin_error_string(error).decode()
    threads = out.shape[-1]
    ids = torch.arange(threads, dtype=torch.float32)
    for b in range(3):
        assert torch.equal(out[b, 0], (ids + 1) % threads), f"block {b}: a thread read its neighbour before the barrier"
        assert torch.isnan(out[b, 1]).all(), f"block {b}: unwritten __shared__ memory was not poisoned"
        assert torch.equal(out[b, 2], ids + 1000 * b), f"block {b}: __shared__ is not one copy per block"


def test_shim_reports_a_barrier_some_threads_skip(twin):
    error, _ = twin.probe_barrier(blocks=1, diverge=True)
    assert error == cuda_twin.CUDA_ERROR_LAUNCH_FAILURE


def _all_halves() -> torch.Tensor:
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)


def _same_bits_or_both_nan(got: torch.Tensor, want: torch.Tensor, what: str, inputs: torch.Tensor):
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN pattern differs"
    bits = torch.int16 if got.element_size() == 2 else torch.int32
    bad = (got.view(bits) != want.view(bits)) & ~nan
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches, first for input {inputs.flatten()[i].item()!r}: "
                             f"got {got[i].item()!r}, torch gives {want[i].item()!r}")


def test_shim_half_and_bfloat16_conversions_round_to_nearest_even(twin):
    halves = _all_halves()
    _same_bits_or_both_nan(twin.convert("half_to_float", halves.view(torch.int16), torch.float32),
                           halves.float(), "__half2float", halves)
    bfloats = halves.view(torch.bfloat16)
    _same_bits_or_both_nan(twin.convert("bfloat16_to_float", bfloats.view(torch.int16), torch.float32),
                           bfloats.float(), "__bfloat162float", bfloats)
    # Every half value, the midpoints between neighbours (ties), a hair either side, random bits.
    finite = halves.float()[torch.isfinite(halves.float())].sort().values.unique()
    mid = (finite[:-1].double() + finite[1:].double()) / 2
    mid = mid.float()
    tiny = torch.tensor([2.0 ** -25, 2.0 ** -26, 3 * 2.0 ** -26, 65504.0, 65519.99, 65520.0, 65536.0, 1e30,
                         float("inf"), float("nan")])
    generator = torch.Generator().manual_seed(7)
    random_bits = torch.randint(-2 ** 31, 2 ** 31, (1 << 18,), dtype=torch.int64, generator=generator)
    floats = torch.cat([finite, mid, torch.nextafter(mid, torch.tensor(math.inf)),
                        torch.nextafter(mid, torch.tensor(-math.inf)), tiny, -tiny,
                        random_bits.to(torch.int32).view(torch.float32)])
    _same_bits_or_both_nan(twin.convert("float_to_half", floats, torch.int16).view(torch.float16),
                           floats.to(torch.float16), "__float2half_rn", floats)
    bf_finite = bfloats.float()[torch.isfinite(bfloats.float())].sort().values.unique()
    bf_mid = ((bf_finite[:-1].double() + bf_finite[1:].double()) / 2).float()
    bf_floats = torch.cat([bf_finite, bf_mid, torch.nextafter(bf_mid, torch.tensor(math.inf)), floats])
    _same_bits_or_both_nan(twin.convert("float_to_bfloat16", bf_floats, torch.int16).view(torch.bfloat16),
                           bf_floats.to(torch.bfloat16), "__float2bfloat16_rn", bf_floats)


def test_failed_device_query_falls_back_without_leaving_an_error(twin):
    shape = Shape.of((3, 7, 5, 5), False)
    twin.set_multiprocessor_count(80)
    splits_80 = twin.reduction_splits(Shape.of((64, 3, 32, 32), True))
    twin.set_multiprocessor_count(0)  # cudaGetDevice fails
    assert twin.reduction_splits(Shape.of((64, 3, 32, 32), True)) == splits_80
    assert twin.take_error()[0] == 0, "a failed device query must not surface as the next launch's error"
    y = torch.randn(3, 7, 5, 5)
    out = _poisoned(y.shape, y.dtype)
    twin.bn_act_forward(torch.float32, y, None, torch.zeros(7), None, out.tensor, shape, False, STREAM)
    twin.check("launch_bn_act_forward with a failing device query")
    torch.testing.assert_close(out.tensor, y, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# bn_act_forward: out = act(y * scale[c] + shift[c] + residual)

FORWARD_SHAPES = [(3, 7, 5, 5), (2, 16, 8, 8), (5, 3, 1, 1), (2, 40, 3, 3)]
RES_RELU = [(True, True), (False, True), (True, False), (False, False)]
RES_RELU_IDS = ["res-relu", "relu", "res", "plain"]


def _forward_case(twin, dtype, shape, channels_last, with_residual, relu, offsets=None, with_scale=True,
                  multiprocessor_count=132):
    """offsets: element offsets of y, residual, out and the per-channel vectors (misaligned bases)."""
    offsets = offsets or {}
    twin.set_multiprocessor_count(multiprocessor_count)
    acc = _acc(dtype)
    y_values, y64 = _activation(shape, dtype)
    scale_values, scale64 = _channel_vector(shape[1], acc)
    shift_values, shift64 = _channel_vector(shape[1], acc)
    res_values, res64 = _activation(shape, dtype) if with_residual else (None, None)
    y = _placed_input(y_values, channels_last, offsets.get("y", 0))
    residual = _placed_input(res_values, channels_last, offsets.get("res", 0)) if with_residual else None
    scale = _placed_input(scale_values, False, offsets.get("vec", 0)) if with_scale else None
    shift = _placed_input(shift_values, False, offsets.get("vec", 0))
    out = _poisoned(shape, dtype, channels_last, offsets.get("out", 0))

    ref = y64 * (_view(scale64) if with_scale else 1.0) + _view(shift64)
    stock = y_values * (_view(scale_values.to(dtype)) if with_scale else 1.0) + _view(shift_values.to(dtype))
    if with_residual:
        ref, stock = ref + res64, stock + res_values
    if relu:
        ref, stock = torch.relu(ref), torch.relu(stock)

    twin.bn_act_forward(dtype, y, scale, shift, residual, out.tensor, Shape.of(shape, channels_last), relu, STREAM)
    case = f"bn_act_forward {_id(dtype)} {_id(shape)} {'cl' if channels_last else 'nchw'} offsets={offsets}"
    twin.check(case)
    vec = _expected_pack(dtype, shape, channels_last, y, residual, out.tensor)
    _kernel(twin, f"bn_act_forward_kernel<{cuda_twin.CUDA_TYPE_NAMES[dtype]}, {vec}, {_cpp_bool(channels_last)}, "
                  f"{_cpp_bool(relu)}, {_cpp_bool(with_residual)}>")
    out.check_guards(case)
    assert_tolerance(out.tensor, ref, stock, case)
    return vec


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", FORWARD_SHAPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset1"])
@pytest.mark.parametrize("with_residual,relu", RES_RELU, ids=RES_RELU_IDS)
def test_bn_act_forward(twin, dtype, shape, layout, aligned, with_residual, relu):
    offsets = None if aligned else {"y": 1, "res": 1, "out": 1, "vec": 1}
    vec = _forward_case(twin, dtype, shape, LAYOUTS[layout], with_residual, relu, offsets)
    if shape == (2, 16, 8, 8):  # C and H*W multiples of every pack width: the wide path, when aligned
        assert (vec > 1) == aligned


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("misaligned", ["y", "res", "out"])
def test_bn_act_forward_one_misaligned_pointer_takes_the_scalar_path(twin, dtype, layout, misaligned):
    vec = _forward_case(twin, dtype, (2, 16, 8, 8), LAYOUTS[layout], True, True, {misaligned: 1})
    assert vec == 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("multiprocessor_count", [1, 132])
def test_bn_act_forward_grid_stride_loop(twin, layout, multiprocessor_count):
    """One SM: 16 blocks of 256 threads, so 16896 packs of 4 take two trips round the loop."""
    shape = (4, 16, 33, 32)
    vec = _forward_case(twin, torch.float32, shape, LAYOUTS[layout], True, True,
                        multiprocessor_count=multiprocessor_count)
    assert vec == 4
    blocks = twin.launches()[-1].grid[0]
    assert blocks == min(math.ceil(math.prod(shape) / vec / 256), 16 * multiprocessor_count)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_act_forward_scale_none(twin, layout):
    _forward_case(twin, torch.float32, (3, 7, 5, 5), LAYOUTS[layout], True, True, with_scale=False)


def test_bn_act_forward_relu_propagates_nan(twin):
    y = torch.zeros(1, 3, 2, 2)
    y[0, 1, 0, 0] = float("nan")
    out = _poisoned(y.shape, y.dtype)
    out.tensor.zero_()
    twin.bn_act_forward(torch.float32, y, None, torch.zeros(3), None, out.tensor, Shape.of(y.shape, False), True,
                        STREAM)
    twin.check("launch_bn_act_forward")
    assert torch.isnan(out.tensor[0, 1, 0, 0]) and int(torch.isnan(out.tensor).sum()) == 1


# ------------------------------------------------------------------------------------------
# batch statistics: partials + finalize

# (shape, multiprocessor count): odd shapes, 1x1 maps, C not a multiple of 32, and shapes with
# enough rows for several uneven splits in each layout (NCHW splits need 2048 rows each).
STATS_CASES = [((3, 7, 5, 5), 132), ((2, 16, 8, 8), 1), ((5, 3, 1, 1), 132), ((2, 40, 3, 3), 132),
               ((2, 40, 3, 3), 1), ((3, 5, 37, 41), 132), ((3, 5, 37, 41), 1), ((4099, 3, 1, 1), 132),
               ((3, 7, 13, 11), 7)]
STATS_IDS = [f"{_id(shape)}-sm{count}" for shape, count in STATS_CASES]


def _expected_splits(shape: Shape, multiprocessor_count: int) -> int:
    """reduction_splits() of bn_act_kernels.cu, restated."""
    rows = shape.batch * shape.spatial
    channel_blocks = math.ceil(shape.channels / 32) if shape.channels_last else shape.channels
    wanted = math.ceil(multiprocessor_count * 8 / max(channel_blocks, 1))
    by_rows = max(1, rows // (64 if shape.channels_last else 2048))
    return max(1, min(wanted, by_rows, 65535))


def _stats_case(twin, dtype, shape, channels_last, multiprocessor_count, offset=0.0, y_offset=0):
    twin.set_multiprocessor_count(multiprocessor_count)
    acc = _acc(dtype)
    y_values, y64 = _activation(shape, dtype, offset)
    y = _placed_input(y_values, channels_last, y_offset)
    shp = Shape.of(shape, channels_last)
    splits = twin.reduction_splits(shp)
    assert splits == _expected_splits(shp, multiprocessor_count)
    nbytes = twin.batch_stats_workspace_bytes(dtype, shp)
    assert nbytes == splits * shape[1] * 3 * torch.empty(0, dtype=acc).element_size()
    workspace = _poisoned_workspace(nbytes)
    mean, var = _poisoned((shape[1],), acc), _poisoned((shape[1],), acc)
    case = f"batch_stats {_id(dtype)} {_id(shape)} {'cl' if channels_last else 'nchw'} sm={multiprocessor_count}"

    twin.batch_stats_partials(dtype, y, workspace.tensor, shp, STREAM)
    twin.check(case + " partials")
    twin.batch_stats_finalize(dtype, workspace.tensor, mean.tensor, var.tensor, shp, STREAM)
    twin.check(case + " finalize")

    reduce = _kernel(twin, "reduce_channels_last_kernel" if channels_last else "reduce_nchw_kernel")
    channel_blocks = math.ceil(shape[1] / 32) if channels_last else shape[1]
    assert reduce.grid == (channel_blocks, splits, 1) and reduce.block == (32, 8, 1), reduce
    _kernel(twin, "batch_stats_finalize_kernel")
    workspace.check_guards(case + " workspace")
    mean.check_guards(case + " mean")
    var.check_guards(case + " var")
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    stock_var, stock_mean = torch.var_mean(y_values.to(acc), dim=(0, 2, 3), unbiased=False)
    assert_tolerance(mean.tensor, mean64, stock_mean, case + " mean")
    assert_tolerance(var.tensor, var64, stock_var, case + " var (biased)")
    return splits


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_id)
@pytest.mark.parametrize("shape,multiprocessor_count", STATS_CASES, ids=STATS_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_stats(twin, dtype, shape, multiprocessor_count, layout):
    _stats_case(twin, dtype, shape, LAYOUTS[layout], multiprocessor_count)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("y_offset", [0, 1], ids=["aligned", "offset1"])
def test_batch_stats_far_from_zero(twin, layout, y_offset):
    """A mean 100x the std, unaligned: Welford partials and the Chan merge keep the variance."""
    _stats_case(twin, torch.float32, (3, 5, 37, 41), LAYOUTS[layout], 132, offset=100.0, y_offset=y_offset)


def test_stats_cases_cover_one_and_many_splits():
    for layout, channels_last in LAYOUTS.items():
        splits = {_expected_splits(Shape.of(shape, channels_last), count) for shape, count in STATS_CASES}
        assert 1 in splits and max(splits) > 1, f"{layout}: the cases give only {sorted(splits)} splits"


# ------------------------------------------------------------------------------------------
# bn_act_backward: partials (+ grad_residual), finalize, grad_y

BACKWARD_CASES = STATS_CASES
RELU_RESGRAD = [(True, True), (True, False), (False, True), (False, False)]
RELU_RESGRAD_IDS = ["relu-resgrad", "relu", "resgrad", "plain"]


def _backward_case(twin, dtype, shape, channels_last, relu, residual_grad, multiprocessor_count=132,
                   with_weight=True, offset=0):
    twin.set_multiprocessor_count(multiprocessor_count)
    acc = _acc(dtype)
    y_values, y64 = _activation(shape, dtype, offset=0.5)
    _, residual64 = _activation(shape, dtype)
    grad_out_values, grad_out64 = _activation(shape, dtype)
    weight_values, weight64 = _channel_vector(shape[1], acc, positive=True)
    bias_values, bias64 = _channel_vector(shape[1], acc)
    if not with_weight:
        weight_values, weight64 = None, torch.ones_like(bias64)

    def unit(y_, w_, b_, r_):
        out_ = F.batch_norm(y_, None, None, w_, b_, training=True, eps=EPS) + r_
        return torch.relu(out_) if relu else out_

    leaves64 = [t.clone().requires_grad_() for t in (y64, weight64, bias64, residual64)]
    out64 = unit(*leaves64)
    refs = torch.autograd.grad(out64, leaves64, grad_out64)
    stock_leaves = [t.clone().to(dtype).requires_grad_() for t in (y64, weight64, bias64, residual64)]
    stocks = torch.autograd.grad(unit(*stock_leaves), stock_leaves, grad_out_values)

    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    mean = _placed_input(mean64.to(acc), False, offset)
    invstd = _placed_input(torch.rsqrt(var64 + EPS).to(acc), False, offset)
    weight = _placed_input(weight_values, False, offset) if with_weight else None
    y = _placed_input(y_values, channels_last, offset)
    grad_out = _placed_input(grad_out_values, channels_last, offset)
    out = _placed_input(out64.detach().to(dtype), channels_last, offset)
    shp = Shape.of(shape, channels_last)
    assert twin.reduction_splits(shp) == _expected_splits(shp, multiprocessor_count)
    nbytes = twin.bn_act_backward_workspace_bytes(dtype, shp)
    assert nbytes == (twin.reduction_splits(shp) * 2 + 3) * shape[1] * torch.empty(0, dtype=acc).element_size()
    workspace = _poisoned_workspace(nbytes)
    grad_residual = _poisoned(shape, dtype, channels_last, offset) if residual_grad else None
    grad_weight, grad_bias = _poisoned((shape[1],), acc), _poisoned((shape[1],), acc)
    grad_y = _poisoned(shape, dtype, channels_last, offset)
    case = (f"bn_act_backward {_id(dtype)} {_id(shape)} {'cl' if channels_last else 'nchw'} "
            f"sm={multiprocessor_count} relu={relu} residual_grad={residual_grad} offset={offset}")

    gr = grad_residual.tensor if residual_grad else None
    twin.bn_act_backward_partials(dtype, grad_out, out, y, mean, gr, workspace.tensor, shp, relu, STREAM)
    twin.check(case + " partials")
    twin.bn_act_backward_finalize(dtype, workspace.tensor, invstd, weight, grad_weight.tensor, grad_bias.tensor, shp,
                                  STREAM)
    twin.check(case + " finalize")
    twin.bn_act_backward_grad_y(dtype, grad_out, out, gr, y, mean, workspace.tensor, grad_y.tensor, shp, relu, STREAM)
    twin.check(case + " grad_y")

    _kernel(twin, "reduce_channels_last_kernel" if channels_last else "reduce_nchw_kernel")
    _kernel(twin, "bn_act_backward_finalize_kernel")
    vec = _expected_pack(dtype, shape, channels_last, gr if residual_grad else grad_out,
                         None if residual_grad else out, y, grad_y.tensor)
    _kernel(twin, f"bn_act_backward_grad_y_kernel<{cuda_twin.CUDA_TYPE_NAMES[dtype]}, {vec}, "
                  f"{_cpp_bool(channels_last)}, {_cpp_bool(relu and not residual_grad)}, {_cpp_bool(residual_grad)}>")
    workspace.check_guards(case + " workspace")
    for placed, name in ((grad_y, "grad_y"), (grad_weight, "grad_weight"), (grad_bias, "grad_bias")):
        placed.check_guards(f"{case} {name}")
    assert_tolerance(grad_y.tensor, refs[0], stocks[0], case + " grad_y")
    if with_weight:
        assert_tolerance(grad_weight.tensor, refs[1], stocks[1], case + " grad_weight")
    assert_tolerance(grad_bias.tensor, refs[2], stocks[2], case + " grad_bias")
    if residual_grad:
        grad_residual.check_guards(case + " grad_residual")
        assert_tolerance(grad_residual.tensor, refs[3], stocks[3], case + " grad_residual")
    return vec


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_id)
@pytest.mark.parametrize("shape,multiprocessor_count", BACKWARD_CASES, ids=STATS_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu,residual_grad", RELU_RESGRAD, ids=RELU_RESGRAD_IDS)
def test_bn_act_backward(twin, dtype, shape, multiprocessor_count, layout, relu, residual_grad):
    _backward_case(twin, dtype, shape, LAYOUTS[layout], relu, residual_grad, multiprocessor_count)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
def test_bn_act_backward_pack_paths(twin, dtype, layout, offset):
    vec = _backward_case(twin, dtype, (2, 16, 8, 8), LAYOUTS[layout], True, offset == 0, offset=offset)
    assert (vec > 1) == (offset == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_act_backward_weight_none(twin, layout):
    _backward_case(twin, torch.float32, (3, 7, 5, 5), LAYOUTS[layout], True, True, with_weight=False)


# ------------------------------------------------------------------------------------------
# the training forward as bn_act_cuda.cpp composes it: statistics, affine in torch, forward


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_forward_composition(twin, dtype, layout):
    shape, channels_last = (3, 13, 9, 7), LAYOUTS[layout]
    acc = _acc(dtype)
    y_values, y64 = _activation(shape, dtype)
    res_values, res64 = _activation(shape, dtype)
    weight, weight64 = _channel_vector(shape[1], acc, positive=True)
    bias, bias64 = _channel_vector(shape[1], acc)
    y = _placed_input(y_values, channels_last, 0)
    residual = _placed_input(res_values, channels_last, 0)
    shp = Shape.of(shape, channels_last)
    workspace = _poisoned_workspace(twin.batch_stats_workspace_bytes(dtype, shp))
    mean, var = torch.full((shape[1],), float("nan"), dtype=acc), torch.full((shape[1],), float("nan"), dtype=acc)
    twin.batch_stats_partials(dtype, y, workspace.tensor, shp, STREAM)
    twin.check("partials")
    twin.batch_stats_finalize(dtype, workspace.tensor, mean, var, shp, STREAM)
    twin.check("finalize")
    scale = torch.sqrt(var + EPS).reciprocal() * weight  # as bn_act_train_forward_cuda
    shift = bias - mean * scale
    out = _poisoned(shape, dtype, channels_last)
    twin.bn_act_forward(dtype, y, scale, shift, residual, out.tensor, shp, True, STREAM)
    twin.check("forward")
    ref = torch.relu(F.batch_norm(y64, None, None, weight64, bias64, training=True, eps=EPS) + res64)
    stock = torch.relu(F.batch_norm(y_values.to(acc), None, None, weight, bias, training=True, eps=EPS)
                       + res_values.to(acc)).to(dtype)
    assert_tolerance(out.tensor, ref, stock, f"train forward {_id(dtype)} {layout}")


# ------------------------------------------------------------------------------------------
# nothing to do: C = 0 or N*H*W = 0

EMPTY_SHAPES = [(3, 0, 5, 5), (0, 7, 5, 5), (2, 7, 0, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_shapes_launch_nothing_and_fail_nothing(twin, dtype, shape, layout):
    """No zero-size grid (CUDA: "invalid configuration argument"), no kernel over nothing; the
    per-channel outputs of an empty reduction are still written: bn_act_cuda.cpp and the CPU
    kernels give grad_weight = grad_bias = 0, and batch statistics are Welford's empty state
    (mean 0, var 0: welford_init / welford_biased_var), which the ops reject before launching."""
    channels_last, acc, channels = LAYOUTS[layout], _acc(dtype), shape[1]
    shp = Shape.of(shape, channels_last)
    y = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last if channels_last else
                                               torch.contiguous_format)
    vector = torch.randn(channels).to(acc)
    out = torch.empty_like(y)
    twin.bn_act_forward(dtype, y, vector, vector, y, out, shp, True, STREAM)
    twin.check(f"launch_bn_act_forward on {shape}")

    workspace = _poisoned_workspace(twin.batch_stats_workspace_bytes(dtype, shp))
    mean, var = _poisoned((channels,), acc), _poisoned((channels,), acc)
    twin.batch_stats_partials(dtype, y, workspace.tensor, shp, STREAM)
    twin.check(f"launch_batch_stats_partials on {shape}")
    twin.batch_stats_finalize(dtype, workspace.tensor, mean.tensor, var.tensor, shp, STREAM)
    twin.check(f"launch_batch_stats_finalize on {shape}")
    assert torch.equal(mean.tensor, torch.zeros(channels, dtype=acc)), f"mean of an empty reduction: {mean.tensor}"
    assert torch.equal(var.tensor, torch.zeros(channels, dtype=acc)), f"var of an empty reduction: {var.tensor}"
    mean.check_guards("mean")
    var.check_guards("var")

    workspace = _poisoned_workspace(twin.bn_act_backward_workspace_bytes(dtype, shp))
    grad_weight, grad_bias = _poisoned((channels,), acc), _poisoned((channels,), acc)
    grad_y, grad_residual = torch.empty_like(y), torch.empty_like(y)
    twin.bn_act_backward_partials(dtype, y, y, y, vector, grad_residual, workspace.tensor, shp, True, STREAM)
    twin.check(f"launch_bn_act_backward_partials on {shape}")
    twin.bn_act_backward_finalize(dtype, workspace.tensor, vector, vector, grad_weight.tensor, grad_bias.tensor, shp,
                                  STREAM)
    twin.check(f"launch_bn_act_backward_finalize on {shape}")
    twin.bn_act_backward_grad_y(dtype, y, y, grad_residual, y, vector, workspace.tensor, grad_y, shp, True, STREAM)
    twin.check(f"launch_bn_act_backward_grad_y on {shape}")
    assert torch.equal(grad_weight.tensor, torch.zeros(channels, dtype=acc)), grad_weight.tensor
    assert torch.equal(grad_bias.tensor, torch.zeros(channels, dtype=acc)), grad_bias.tensor
    grad_weight.check_guards("grad_weight")
    grad_bias.check_guards("grad_bias")

    # Only the per-channel merges have work here (C > 0): one thread per channel.
    launched = [launch.kernel.split("::")[-1].split("<")[0] for launch in twin.launches()]
    expected = ["batch_stats_finalize_kernel", "bn_act_backward_finalize_kernel"] if channels else []
    assert launched == expected, f"{shape}: launched {launched}"


# ------------------------------------------------------------------------------------------
# determinism and races: results must not depend on the order threads and blocks run in


@pytest.mark.parametrize("layout", LAYOUTS)
def test_results_do_not_depend_on_thread_order(twin, layout):
    shape, channels_last, dtype = (4, 5, 33, 32), LAYOUTS[layout], torch.float32
    shp = Shape.of(shape, channels_last)
    assert twin.reduction_splits(shp) > 1
    y = _placed_input(torch.randn(shape), channels_last, 0)
    grad_out = _placed_input(torch.randn(shape), channels_last, 0)
    out = _placed_input(torch.randn(shape), channels_last, 0)
    vector = torch.rand(shape[1]) + 0.5

    def run():
        results = {}
        ws = _poisoned_workspace(twin.batch_stats_workspace_bytes(dtype, shp)).tensor
        mean, var = torch.empty(shape[1]), torch.empty(shape[1])
        twin.batch_stats_partials(dtype, y, ws, shp, STREAM)
        twin.batch_stats_finalize(dtype, ws, mean, var, shp, STREAM)
        results.update(stats_workspace=ws, mean=mean, var=var)
        ws = _poisoned_workspace(twin.bn_act_backward_workspace_bytes(dtype, shp)).tensor
        grad_residual, grad_y = torch.empty_like(y), torch.empty_like(y)
        grad_weight, grad_bias = torch.empty(shape[1]), torch.empty(shape[1])
        twin.bn_act_backward_partials(dtype, grad_out, out, y, mean, grad_residual, ws, shp, True, STREAM)
        twin.bn_act_backward_finalize(dtype, ws, vector, vector, grad_weight, grad_bias, shp, STREAM)
        twin.bn_act_backward_grad_y(dtype, grad_out, out, grad_residual, y, mean, ws, grad_y, shp, True, STREAM)
        results.update(backward_workspace=ws, grad_residual=grad_residual, grad_y=grad_y, grad_weight=grad_weight,
                       grad_bias=grad_bias)
        twin.check("run")
        return results

    baseline = run()
    for schedule, seed in [(cuda_twin.SCHEDULE_DESCENDING, 0), (cuda_twin.SCHEDULE_SHUFFLED, 1),
                           (cuda_twin.SCHEDULE_SHUFFLED, 2)]:
        twin.set_schedule(schedule, seed)
        for name, value in run().items():
            assert torch.equal(value.contiguous().view(-1).view(torch.uint8),
                               baseline[name].contiguous().view(-1).view(torch.uint8)), (
                f"{name} differs when threads run in schedule {schedule} (seed {seed}): a race")


# ------------------------------------------------------------------------------------------
# cost per element of the NCHW reduction must not grow as H*W shrinks


@pytest.mark.skipif(SANITIZED, reason="timing: meaningless under sanitizers")
def test_nchw_reduction_on_1x1_maps_costs_what_larger_maps_cost(twin):
    """A thread steps kReductionThreads positions at a time through (n, h*w); on 1x1 maps a step
    must not cost kReductionThreads / (H*W) iterations. Same rows and grid either way, so the same
    CPU time is expected (thread CPU time: other processes on the machine do not count)."""
    rows = 1 << 20

    def cpu_seconds(shape):
        shp = Shape.of(shape, False)
        y = torch.randn(shape)
        ws = torch.empty(twin.batch_stats_workspace_bytes(torch.float32, shp), dtype=torch.uint8)
        best = math.inf
        for _ in range(3):
            start = time.thread_time()
            twin.batch_stats_partials(torch.float32, y, ws, shp, STREAM)
            best = min(best, time.thread_time() - start)
        twin.check(f"partials {shape}")
        return best

    twin.set_multiprocessor_count(1)  # few blocks, many positions per thread: the stepping dominates
    one_by_one = cpu_seconds((rows, 1, 1, 1))
    sixteen = cpu_seconds((rows // 256, 1, 16, 16))
    assert one_by_one < 3 * sixteen + 0.01, (
        f"NCHW reduction over {rows} rows: {one_by_one * 1e3:.1f} ms CPU on 1x1 maps vs {sixteen * 1e3:.1f} ms on "
        "16x16 maps")


# ------------------------------------------------------------------------------------------
# the same kernels under AddressSanitizer + UBSan


@pytest.mark.slow
def test_sanitizers_find_nothing(twin):
    """Runs this file's cases against the sanitized build, in a python with libasan preloaded; any
    report (out-of-bounds access, misaligned pack, signed overflow, ...) fails with the report.
    About 15 s, plus 10 s to build the sanitized library the first time."""
    if SANITIZED:
        pytest.skip("this is the sanitized run")
    if cuda_twin.asan_runtime() is None:
        pytest.skip("g++ has no libasan.so to preload")
    library = cuda_twin.build("sanitized")
    command = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-v", "-s", "-x", "-p",
               "no:cacheprovider", "-k", "not sanitizers and not 1x1_maps_costs"]
    result = subprocess.run(command, env=cuda_twin.sanitized_environment(library), cwd=cuda_twin.ROOT,
                            capture_output=True, text=True, timeout=600)
    markers = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")
    found = [marker for marker in markers if marker in result.stderr]
    running = [line for line in result.stdout.splitlines() if "::" in line][-1:]  # -v: the test that was running
    assert result.returncode == 0 and not found, (
        f"sanitized run: exit code {result.returncode}, {found or 'no sanitizer report'}, in {running}\n"
        f"{result.stderr[-12000:]}\n{result.stdout[-3000:]}")
    assert " passed" in result.stdout, result.stdout[-5000:]
