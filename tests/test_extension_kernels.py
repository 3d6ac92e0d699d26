"""The compiled kernels of ``resnet_fast._C`` (CPU here, CUDA under ``-m cuda``) against float64 references.

Each op is compared with a pure-torch float64 formula under the project's tolerance rule
(``tests/numerics.py``): at most twice the error of the stock PyTorch path in the same dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_fast import _extension
from tests.numerics import assert_tolerance, poison_allocator

if _extension.extension() is None:
    pytest.skip(f"resnet_fast._C is not available: {_extension.load_error()}", allow_module_level=True)

from resnet_fast.ops import extension as ext  # noqa: E402
from resnet_fast.ops.folding import ConvGeometry, FoldedConv  # noqa: E402

ops = torch.ops.resnet_fast

SHAPES = [(1, 3, 7, 9), (3, 13, 9, 7), (2, 16, 8, 8)]  # odd sizes, plus one that fits CUDA's 16-byte packs
SHAPE_IDS = ["1x3x7x9", "3x13x9x7", "2x16x8x8"]
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _other_layout(layout: str) -> str:
    return "cl" if layout == "nchw" else "nchw"


def _activation(shape, dtype, layout, device="cpu", offset=0.0):
    """Random activations in `dtype` (exactly representable there) and their float64 twin."""
    t = (torch.randn(shape, dtype=torch.float64) * 1.5 + offset).to(dtype)
    return t.to(device).contiguous(memory_format=LAYOUTS[layout]), t.double()


def _channel_vector(channels, device="cpu", positive=False):
    v = torch.randn(channels, dtype=torch.float64)
    v = v.abs() + 0.5 if positive else v
    return v.float().to(device), v.float().double()


def _view(v):
    return v.view(1, -1, 1, 1)


def _memory_format_ok(out, layout):
    return out.is_contiguous(memory_format=LAYOUTS[layout])


# ------------------------------------------------------------------------------------------
# bn_act_forward


def _check_forward(device, dtype, shape, layout, residual_layout, with_scale, with_residual, relu):
    y, y64 = _activation(shape, dtype, layout, device)
    scale, scale64 = _channel_vector(shape[1], device)
    shift, shift64 = _channel_vector(shape[1], device)
    residual, residual64 = _activation(shape, dtype, residual_layout, device) if with_residual else (None, None)
    ref = y64 * (_view(scale64) if with_scale else 1.0) + _view(shift64)
    stock = y * (_view(scale.to(dtype)) if with_scale else 1.0) + _view(shift.to(dtype))
    if with_residual:
        ref, stock = ref + residual64, stock + residual
    if relu:
        ref, stock = torch.relu(ref), torch.relu(stock)
    poison_allocator(y)
    out = ops.bn_act_forward(y, scale if with_scale else None, shift, residual, relu)
    assert out.dtype == dtype and out.device == y.device
    assert _memory_format_ok(out, layout), "output must keep y's memory format"
    assert_tolerance(out.cpu(), ref, stock.cpu(), "bn_act_forward")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_residual,relu", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["res-relu", "relu", "res", "plain"])
def test_bn_act_forward(dtype, shape, layout, with_residual, relu):
    _check_forward("cpu", dtype, shape, layout, _other_layout(layout), True, with_residual, relu)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_act_forward_scale_none_and_same_layout_residual(layout):
    _check_forward("cpu", torch.float32, (3, 13, 9, 7), layout, layout, False, True, True)


def test_bn_act_forward_float16():
    _check_forward("cpu", torch.float16, (3, 13, 9, 7), "cl", "nchw", True, True, True)


def test_bn_act_forward_non_dense_input_is_copied():
    y = torch.randn(3, 13, 18, 7)[:, :, ::2]  # neither NCHW- nor channels_last-contiguous
    shift = torch.randn(13)
    out = ops.bn_act_forward(y, None, shift, None, True)
    torch.testing.assert_close(out, torch.relu(y + _view(shift)))


def test_relu_propagates_nan_like_torch():
    y = torch.zeros(1, 3, 2, 2)
    y[0, 1, 0, 0] = float("nan")
    out = ops.bn_act_forward(y, None, torch.zeros(3), None, True)
    assert torch.isnan(out[0, 1, 0, 0]) and torch.isnan(torch.relu(y)[0, 1, 0, 0])
    assert int(torch.isnan(out).sum()) == 1


# ------------------------------------------------------------------------------------------
# batch_stats


def _check_batch_stats(device, dtype, shape, layout, offset):
    y, y64 = _activation(shape, dtype, layout, device, offset=offset)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    stock_var, stock_mean = torch.var_mean(y.float() if dtype != torch.float64 else y, dim=(0, 2, 3), unbiased=False)
    mean, var = ops.batch_stats(y)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == expected and var.dtype == expected
    assert_tolerance(mean.cpu(), mean64, stock_mean.cpu(), "batch mean")
    assert_tolerance(var.cpu(), var64, stock_var.cpu(), "batch var (biased)")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [0.0, 100.0], ids=["centred", "offset100"])
def test_batch_stats(dtype, shape, layout, offset):
    _check_batch_stats("cpu", dtype, shape, layout, offset)


def test_batch_stats_large_offset_is_stable():
    """A mean 1e4 times the std: naive E[x^2] - E[x]^2 in float32 would lose every digit."""
    y = (torch.randn(4, 5, 33, 31, dtype=torch.float64) + 1e4).float()
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    for layout in LAYOUTS.values():
        mean, var = ops.batch_stats(y.contiguous(memory_format=layout))
        torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=0)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)


def test_batch_stats_constant_channel_has_zero_variance():
    y = torch.full((2, 3, 5, 5), 0.1)
    _, var = ops.batch_stats(y.contiguous(memory_format=torch.channels_last))
    assert (var >= 0).all() and var.max() < 1e-12


# ------------------------------------------------------------------------------------------
# bn_act_train_forward (statistics + normalisation + residual + ReLU in one op)

# Large enough that the reductions flush their fp32 partials into fp64 several times per channel.
FLUSHING_SHAPE = (2, 19, 40, 41)


def _check_train_forward(device, dtype, shape, layout, with_affine, with_residual, relu, offset=0.0):
    eps = 1e-5
    y, y64 = _activation(shape, dtype, layout, device, offset=offset)
    weight, weight64 = _channel_vector(shape[1], device, positive=True) if with_affine else (None, None)
    bias, bias64 = _channel_vector(shape[1], device) if with_affine else (None, None)
    residual, residual64 = (_activation(shape, dtype, _other_layout(layout), device) if with_residual
                            else (None, None))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref = F.batch_norm(y64, None, None, weight64, bias64, training=True, eps=eps)
    # The stock path in the accumulation type, rounded once to dtype: the error scale of fp32 math.
    stock = F.batch_norm(y.to(acc), None, None, None if weight is None else weight.to(acc),
                         None if bias is None else bias.to(acc), training=True, eps=eps)
    if with_residual:
        ref, stock = ref + residual64, stock + residual.to(acc)
    if relu:
        ref, stock = torch.relu(ref), torch.relu(stock)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    stock_var, stock_mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), unbiased=False)
    poison_allocator(y)
    out, mean, var = ops.bn_act_train_forward(y, weight, bias, residual, eps, relu)
    assert out.dtype == dtype and _memory_format_ok(out, layout), "output must keep y's dtype and memory format"
    assert mean.dtype == acc and var.dtype == acc
    assert_tolerance(mean.cpu(), mean64, stock_mean.cpu(), "batch mean")
    assert_tolerance(var.cpu(), var64, stock_var.cpu(), "batch var (biased)")
    assert_tolerance(out.cpu(), ref, stock.to(dtype).cpu(), "bn_act_train_forward")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES + [FLUSHING_SHAPE], ids=SHAPE_IDS + ["2x19x40x41"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_residual,relu", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["res-relu", "relu", "res", "plain"])
def test_bn_act_train_forward(dtype, shape, layout, with_residual, relu):
    _check_train_forward("cpu", dtype, shape, layout, True, with_residual, relu)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_act_train_forward_without_affine_and_far_from_zero(layout):
    _check_train_forward("cpu", torch.float32, FLUSHING_SHAPE, layout, False, True, True, offset=100.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_stats_flushing_shape(layout):
    _check_batch_stats("cpu", torch.float32, FLUSHING_SHAPE, layout, 100.0)


# ------------------------------------------------------------------------------------------
# bn_act_backward


def _check_backward(device, dtype, shape, layout, with_weight, relu, residual_grad):
    eps = 1e-5
    y, y64 = _activation(shape, dtype, layout, device, offset=0.5)
    residual, residual64 = _activation(shape, dtype, _other_layout(layout), device)
    grad_out, grad_out64 = _activation(shape, dtype, _other_layout(layout), device)
    weight, weight64 = _channel_vector(shape[1], device, positive=True) if with_weight else (None, None)
    bias, bias64 = _channel_vector(shape[1], device)

    def unit(y_, w_, b_, r_):
        out = F.batch_norm(y_, None, None, w_, b_, training=True, eps=eps) + r_
        return torch.relu(out) if relu else out

    leaves64 = [t.clone().requires_grad_() for t in (y64, weight64 if with_weight else torch.ones_like(bias64),
                                                     bias64, residual64)]
    out64 = unit(*leaves64)
    refs = torch.autograd.grad(out64, leaves64, grad_out64)

    stock_leaves = [t.clone().requires_grad_() for t in (y, weight.to(dtype) if with_weight else
                                                         torch.ones_like(bias, dtype=dtype), bias.to(dtype), residual)]
    stocks = torch.autograd.grad(unit(*stock_leaves), stock_leaves, grad_out)

    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean = mean64.to(acc).to(device)
    invstd = torch.rsqrt(var64 + eps).to(acc).to(device)
    out = out64.detach().to(dtype).to(device).contiguous(memory_format=LAYOUTS[layout])
    poison_allocator(y)
    grad_y, grad_weight, grad_bias, grad_residual = ops.bn_act_backward(
        grad_out, out, y, mean, invstd, weight, relu, residual_grad)
    assert grad_y.dtype == dtype and _memory_format_ok(grad_y, layout)
    assert grad_weight.dtype == acc and grad_bias.dtype == acc
    assert_tolerance(grad_y.cpu(), refs[0], stocks[0].cpu(), "grad_y")
    assert_tolerance(grad_weight.cpu(), refs[1], stocks[1].cpu(), "grad_weight")
    assert_tolerance(grad_bias.cpu(), refs[2], stocks[2].cpu(), "grad_bias")
    if residual_grad:
        assert grad_residual.dtype == dtype and _memory_format_ok(grad_residual, layout)
        assert_tolerance(grad_residual.cpu(), refs[3], stocks[3].cpu(), "grad_residual")
    else:
        assert grad_residual.numel() == 0


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu,residual_grad", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["relu-resgrad", "relu", "resgrad", "plain"])
def test_bn_act_backward(dtype, shape, layout, relu, residual_grad):
    _check_backward("cpu", dtype, shape, layout, True, relu, residual_grad)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_act_backward_weight_none(layout):
    _check_backward("cpu", torch.float32, (3, 13, 9, 7), layout, False, True, True)


# ------------------------------------------------------------------------------------------
# opcheck: schemas, fake kernels, dispatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_primitive_ops(dtype, layout):
    shape = (3, 13, 7, 9)
    y, _ = _activation(shape, dtype, layout)
    residual, _ = _activation(shape, dtype, _other_layout(layout))
    scale, shift = torch.randn(13), torch.randn(13)
    torch.library.opcheck(ops.bn_act_forward.default, (y, scale, shift, residual, True))
    torch.library.opcheck(ops.bn_act_forward.default, (y, None, shift, None, False))
    torch.library.opcheck(ops.batch_stats.default, (y,))
    torch.library.opcheck(ops.bn_act_train_forward.default, (y, scale, shift, residual, 1e-5, True))
    torch.library.opcheck(ops.bn_act_train_forward.default, (y, None, None, None, 1e-3, False))
    mean, var = ops.batch_stats(y)
    invstd = torch.rsqrt(var + 1e-5)
    out = ops.bn_act_forward(y, scale, shift, residual, True)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(ops.bn_act_backward.default, (grad_out, out, y, mean, invstd, scale, True, True))
    torch.library.opcheck(ops.bn_act_backward.default, (grad_out, out, y, mean, invstd, None, False, False))


@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
def test_training_unit_traces_under_torch_compile(with_residual):
    """fullgraph: the unit's autograd.Function and ops trace (fake kernels), forward and backward."""
    y = torch.randn(3, 13, 7, 9, requires_grad=True)
    weight = (torch.rand(13) + 0.5).requires_grad_()
    bias = torch.randn(13, requires_grad=True)
    residual = torch.randn(3, 13, 7, 9, requires_grad=True) if with_residual else None
    leaves = [t for t in (y, weight, bias, residual) if t is not None]

    def unit(y, weight, bias, residual):
        return ext._BnActTrain.apply(y, weight, bias, residual, 1e-5, True)[0]

    grad = torch.randn(3, 13, 7, 9)
    expected = unit(y, weight, bias, residual)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    compiled = torch.compile(unit, fullgraph=True, backend="aot_eager")
    out = compiled(y, weight, bias, residual)
    grads = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the training unit (extension.bn_act_train): gradients and running statistics


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_unit_gradcheck_float64(relu, layout):
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)

    def fused(y_, w_, b_, r_):
        return ext.bn_act_train(y_, w_, b_, None, None, 0.1, 1e-5, r_, relu)

    def stock(y_, w_, b_, r_):
        out = F.batch_norm(y_, None, None, w_, b_, training=True, eps=1e-5) + r_
        return torch.relu(out) if relu else out

    inputs = (y, weight, bias, residual)
    torch.testing.assert_close(fused(*inputs), stock(*inputs))
    assert torch.autograd.gradcheck(fused, inputs)
    grad = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    ours = torch.autograd.grad(fused(*inputs), inputs, grad)
    theirs = torch.autograd.grad(stock(*inputs), inputs, grad)
    for name, a, b in zip(["y", "weight", "bias", "residual"], ours, theirs):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_training_unit_without_affine_or_residual_grad():
    y = torch.randn(3, 13, 7, 9, requires_grad=True)
    residual = torch.randn(3, 13, 7, 9)  # does not require grad: no grad_residual computed
    out = ext.bn_act_train(y, None, None, None, None, 0.1, 1e-5, residual, True)
    (grad_y,) = torch.autograd.grad(out, [y], torch.ones_like(out))
    y_ref = y.detach().double().requires_grad_()
    ref = torch.relu(F.batch_norm(y_ref, None, None, training=True, eps=1e-5) + residual.double())
    (grad_ref,) = torch.autograd.grad(ref, [y_ref], torch.ones_like(ref))
    torch.testing.assert_close(grad_y.double(), grad_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_running_stats_match_batchnorm2d(momentum, layout):
    bn = torch.nn.BatchNorm2d(13, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(3):
        y = (torch.randn(3, 13, 7, 9) * 2 + 1).contiguous(memory_format=LAYOUTS[layout])
        residual = torch.randn(3, 13, 7, 9)
        expected = torch.relu(bn(y) + residual)
        out = ext.bn_act_train(y, bn.weight, bn.bias, running_mean, running_var, momentum, bn.eps, residual, True)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(running_var, bn.running_var, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# bad inputs: RuntimeError naming the problem


def test_bad_inputs_raise_clear_errors():
    y = torch.randn(2, 13, 5, 5)
    shift = torch.randn(13)
    with pytest.raises(RuntimeError, match=r"shift must be a vector with one value per channel \(13\)"):
        ops.bn_act_forward(y, None, torch.randn(12), None, True)
    with pytest.raises(RuntimeError, match=r"scale must be a vector with one value per channel"):
        ops.bn_act_forward(y, torch.randn(2, 13), shift, None, True)
    with pytest.raises(RuntimeError, match=r"residual dtype Double does not match y dtype Float"):
        ops.bn_act_forward(y, None, shift, y.double(), True)
    with pytest.raises(RuntimeError, match=r"residual shape \[2, 13, 5, 4\] does not match y shape"):
        ops.bn_act_forward(y, None, shift, torch.randn(2, 13, 5, 4), True)
    with pytest.raises(RuntimeError, match=r"y must be 4-d \(N, C, H, W\), got 3-d"):
        ops.bn_act_forward(torch.randn(13, 5, 5), None, shift, None, True)
    with pytest.raises(RuntimeError, match=r"batch_stats: y must be 4-d"):
        ops.batch_stats(torch.randn(13, 5, 5))
    with pytest.raises(RuntimeError, match=r"y must be float32, float64, bfloat16 or float16, got Int"):
        ops.batch_stats(torch.ones(2, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"shift must be float32 or float64, got Half"):
        ops.bn_act_forward(y, None, shift.half(), None, True)
    with pytest.raises(RuntimeError, match=r"bn_act_train_forward: weight must be a vector with one value per channel"):
        ops.bn_act_train_forward(y, torch.randn(12), None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"bn_act_train_forward: bias must be float32 or float64, got Half"):
        ops.bn_act_train_forward(y, None, shift.half(), None, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"bn_act_train_forward: y has no elements per channel"):
        ops.bn_act_train_forward(torch.randn(0, 13, 5, 5), None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"bn_act_train_forward: eps must be non-negative"):
        ops.bn_act_train_forward(y, None, None, None, -1.0, True)
    mean, var = ops.batch_stats(y)
    with pytest.raises(RuntimeError, match=r"invstd must be a vector with one value per channel \(13\)"):
        ops.bn_act_backward(y, y, y, mean, var[:5], None, True, True)
    with pytest.raises(RuntimeError, match=r"grad_out dtype BFloat16 does not match y dtype Float"):
        ops.bn_act_backward(y.bfloat16(), y, y, mean, var, None, True, True)
    with pytest.raises(RuntimeError, match=r"out shape .* does not match y shape"):
        ops.bn_act_backward(y, y[:1], y, mean, var, None, True, True)


# ------------------------------------------------------------------------------------------
# the inference unit (extension.conv_bias_act): oneDNN post-ops or conv + bn_act_forward

CONV_CASES = {
    # name: (C_in, C_out, kernel, stride, padding, dilation, groups)
    "3x3": (8, 12, 3, 1, 1, 1, 1),
    "3x3-s2": (8, 12, 3, 2, 1, 1, 1),
    "1x1": (8, 12, 1, 1, 0, 1, 1),
    "1x1-s2": (8, 12, 1, 2, 0, 1, 1),
    "7x7-s2": (3, 12, 7, 2, 3, 1, 1),
    "3x3-g2": (8, 12, 3, 1, 1, 1, 2),
    "3x3-d2": (8, 12, 3, 1, 2, 2, 1),
}


def _check_conv_unit(dtype, case, layout, residual_layout, with_residual, relu):
    c_in, c_out, k, stride, padding, dilation, groups = CONV_CASES[case]
    x, x64 = _activation((3, c_in, 13, 11), dtype, layout)
    weight64 = torch.randn(c_out, c_in // groups, k, k, dtype=torch.float64) / (c_in * k * k / groups) ** 0.5
    bias64 = torch.randn(c_out, dtype=torch.float64)
    geometry = ConvGeometry((stride, stride), (padding, padding), (dilation, dilation), groups)
    folded = FoldedConv(weight=weight64.to(dtype), bias=bias64.to(dtype), geometry=geometry)
    weight64, bias64 = folded.weight.double(), folded.bias.double()
    args = (geometry.stride, geometry.padding, geometry.dilation, groups)
    ref = F.conv2d(x64, weight64, bias64, *args)
    stock = F.conv2d(x, folded.weight, folded.bias, *args)
    residual = None
    if with_residual:
        residual, residual64 = _activation(ref.shape, dtype, residual_layout)
        ref, stock = ref + residual64, stock + residual
    if relu:
        ref, stock = torch.relu(ref), torch.relu(stock)
    with torch.no_grad():
        out = ext.conv_bias_act(x, folded, residual, relu)
        again = ext.conv_bias_act(x, folded, residual, relu)  # served from the cached packed weight
    assert out.dtype == dtype
    assert_tolerance(out, ref, stock, f"conv_bias_act {case}")
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_residual,relu", [(True, True), (False, True), (True, False)],
                         ids=["res-relu", "relu", "res"])
def test_conv_bias_act(case, layout, with_residual, relu):
    _check_conv_unit(torch.float32, case, layout, _other_layout(layout), with_residual, relu)


@pytest.mark.parametrize("case", ["3x3", "1x1-s2"])
def test_conv_bias_act_bfloat16(case):
    _check_conv_unit(torch.bfloat16, case, "cl", "nchw", True, True)


@pytest.mark.parametrize("case", ["3x3-s2", "3x3-g2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_bias_act_fallback_epilogue(case, layout, monkeypatch):
    """Without oneDNN's fused ops: vendor conv, then bn_act_forward for bias + residual + ReLU."""
    monkeypatch.setattr(ext, "_mkldnn_available", lambda: False)
    _check_conv_unit(torch.float32, case, layout, layout, True, True)


def test_conv_bias_act_packed_weight_is_cached_and_works_for_other_input_sizes(monkeypatch):
    if not ext._mkldnn_available():
        pytest.skip("oneDNN fused convolution ops are not available in this torch build")
    monkeypatch.setenv("RESNET_FAST_CPU_CONV3X3", "onednn")
    folded = FoldedConv(torch.randn(6, 4, 3, 3), torch.randn(6), ConvGeometry((1, 1), (1, 1), (1, 1), 1))
    with torch.no_grad():
        ext.conv_bias_act(torch.randn(2, 4, 9, 9), folded, None, True)
        packed = folded.packed["mkldnn"][1]
        x = torch.randn(5, 4, 6, 13)
        out = ext.conv_bias_act(x, folded, None, True)
    assert folded.packed["mkldnn"][1] is packed
    torch.testing.assert_close(out, torch.relu(F.conv2d(x, folded.weight, folded.bias, padding=1)))


def test_conv_bias_act_with_autograd_uses_differentiable_path():
    folded = FoldedConv(torch.randn(6, 4, 3, 3, requires_grad=True), torch.randn(6), ConvGeometry((1, 1), (1, 1),
                                                                                                 (1, 1), 1))
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    out = ext.conv_bias_act(x, folded, None, True)
    out.sum().backward()
    assert x.grad is not None and folded.weight.grad is not None


# ------------------------------------------------------------------------------------------
# CUDA: the same checks on CUDA tensors against CPU float64 (run by benchmarks/gpu_check.sh)


def _needs_cuda_kernels():
    if not _extension.has_cuda_kernels():
        pytest.skip("resnet_fast._C was built without CUDA kernels")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES + [(2, 64, 5, 5)], ids=SHAPE_IDS + ["2x64x5x5"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_bn_act_forward(dtype, shape, layout):
    _needs_cuda_kernels()
    for with_residual, relu in [(True, True), (False, False)]:
        _check_forward("cuda", dtype, shape, layout, _other_layout(layout), True, with_residual, relu)
    _check_forward("cuda", dtype, shape, layout, layout, False, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 64, 56, 56)], ids=SHAPE_IDS + ["8x64x56x56"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_batch_stats(dtype, shape, layout):
    _needs_cuda_kernels()
    for offset in [0.0, 100.0]:
        _check_batch_stats("cuda", dtype, shape, layout, offset)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES + [(4, 64, 28, 28)], ids=SHAPE_IDS + ["4x64x28x28"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_bn_act_backward(dtype, shape, layout):
    _needs_cuda_kernels()
    for relu, residual_grad in [(True, True), (True, False), (False, False)]:
        _check_backward("cuda", dtype, shape, layout, True, relu, residual_grad)
    _check_backward("cuda", dtype, shape, layout, False, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_bn_act_train_forward(dtype, layout):
    _needs_cuda_kernels()
    for with_residual, relu in [(True, True), (False, False)]:
        _check_train_forward("cuda", dtype, (4, 64, 28, 28), layout, True, with_residual, relu)
    _check_train_forward("cuda", dtype, (3, 13, 9, 7), layout, False, True, True, offset=100.0)


@pytest.mark.cuda
def test_cuda_training_unit_and_opcheck():
    _needs_cuda_kernels()
    y = torch.randn(3, 13, 7, 9, device="cuda", requires_grad=True)
    weight = (torch.rand(13, device="cuda") + 0.5).requires_grad_()
    bias = torch.randn(13, device="cuda", requires_grad=True)
    residual = torch.randn(3, 13, 7, 9, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.bn_act_train_forward.default, (y.detach(), weight.detach(), bias.detach(),
                                                             residual.detach(), 1e-5, True))
    bn = torch.nn.BatchNorm2d(13).cuda()
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    out = ext.bn_act_train(y, bn.weight, bn.bias, running_mean, running_var, 0.1, bn.eps, residual, True)
    torch.testing.assert_close(out, torch.relu(bn(y) + residual), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_mean, bn.running_mean)
    torch.testing.assert_close(running_var, bn.running_var)


@pytest.mark.cuda
def test_cuda_bad_inputs():
    _needs_cuda_kernels()
    y = torch.randn(2, 13, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match=r"shift must be a vector with one value per channel \(13\)"):
        ops.bn_act_forward(y, None, torch.randn(12, device="cuda"), None, True)
    with pytest.raises(RuntimeError, match=r"residual dtype Half does not match y dtype Float"):
        ops.bn_act_forward(y, None, torch.randn(13, device="cuda"), y.half(), True)
    with pytest.raises(RuntimeError, match=r"y must be 4-d"):
        ops.batch_stats(y[0])
