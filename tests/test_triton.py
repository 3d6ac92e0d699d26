"""The ``triton`` backend: every kernel and code path, on small shapes.

Without a GPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``,
set by conftest before anything imports the kernels), so shapes stay tiny:
batch 2, 5x5..9x9 images, 3..40 channels. With a GPU the same tests run on
CUDA, and the ``cuda``-marked ones add realistic shapes, bf16, autotuning and
the per-layer selector.

Every result is compared with a float64 reference under the project's rule
(``tests/numerics.py``: at most twice the stock PyTorch error in the same dtype),
and every kernel output is poisoned (NaN) before the kernel writes it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import backends
from resnet_fast.ops.folding import ConvGeometry, fold_conv_bn
from tests.numerics import assert_tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = backends.unavailable_reason("triton", DEVICE)

pytestmark = [pytest.mark.triton, pytest.mark.skipif(_REASON is not None, reason=f"triton backend: {_REASON}")]

if _REASON is None:
    from resnet_fast.ops import triton as triton_backend
    from resnet_fast.ops.triton import _common, bn_act, bn_stats, conv, select


@pytest.fixture(autouse=True)
def _poison_and_pin(monkeypatch):
    """Poison every kernel output; run our kernels (the selector is tested on its own)."""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    monkeypatch.setenv(select.MODE_ENV, "triton")
    monkeypatch.setattr(conv, "FORCED_CONFIG", None)
    yield


def _randn(*shape, dtype=torch.float32, layout="nchw", scale=1.0, offset=0.0) -> torch.Tensor:
    t = (torch.randn(*shape, dtype=torch.float64) * scale + offset).to(device=DEVICE, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t


def _bn_params(channels: int, dtype=torch.float32):
    """Non-trivial affine parameters and running statistics."""
    weight = _randn(channels, dtype=dtype, scale=0.5, offset=1.0)
    bias = _randn(channels, dtype=dtype, scale=0.5)
    running_mean = _randn(channels, dtype=dtype, scale=0.3)
    running_var = (torch.rand(channels, dtype=torch.float64) + 0.5).to(device=DEVICE, dtype=dtype)
    return weight, bias, running_mean, running_var


def _inference_unit(x, weight, conv_bias, bn, geometry, residual, relu):
    """Plain PyTorch conv -> eval BN -> + residual -> ReLU in x's dtype."""
    bn_weight, bn_bias, running_mean, running_var = bn
    y = F.conv2d(x, weight, conv_bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training=False, eps=1e-5)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _as64(*tensors):
    return [None if t is None else t.detach().double() for t in tensors]


# --------------------------------------------------------------------------- contract


def test_backend_available_and_import_does_not_initialise_cuda():
    assert triton_backend.unavailable_reason() is None
    code = ("import torch, resnet_fast.ops.triton as t; assert t.unavailable_reason() is None; "
            "assert not torch.cuda.is_initialized(), 'importing the triton backend initialised CUDA'")
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_min_block_m_bounds_every_tile():
    """The statistics buffers are sized for MIN_BLOCK_M rows per tile: no tile may be shorter."""
    assert all(config.kwargs["BLOCK_M"] >= conv.MIN_BLOCK_M for config in conv.GPU_CONFIGS)
    assert conv.interpreter_config(1, 1, 1).kwargs["BLOCK_M"] >= conv.MIN_BLOCK_M


# --------------------------------------------------------------------------- inference unit

# (id, C_in, C_out, H, W, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    ("3x3-c3to16", 3, 16, 9, 9, 3, 1, 1, 1, 1),
    ("3x3-s2-c13", 13, 13, 7, 7, 3, 2, 1, 1, 1),
    ("1x1-s1-c8to13", 8, 13, 5, 5, 1, 1, 0, 1, 1),
    ("1x1-s2", 16, 8, 7, 7, 1, 2, 0, 1, 1),
    ("stem-7x7-s2", 3, 8, 9, 9, 7, 2, 3, 1, 1),
    ("3x3-dil2", 8, 16, 9, 9, 3, 1, 2, 2, 1),
    ("3x3-groups2", 8, 16, 7, 7, 3, 1, 1, 1, 2),
    ("3x3-s2-groups2-odd", 6, 10, 7, 7, 3, 2, 1, 1, 2),
]
EPILOGUES = [("res-relu", True, True), ("relu", False, True), ("plain", False, False)]


def _check_inference(case, residual_on, relu, layout, dtype=torch.float32, conv_bias_on=False, name="output"):
    _, c_in, c_out, h, w, k, s, p, d, g = case
    geometry = ConvGeometry((s, s), (p, p), (d, d), g)
    x = _randn(2, c_in, h, w, dtype=dtype, layout=layout)
    weight = _randn(c_out, c_in // g, k, k, dtype=dtype, scale=(c_in // g * k * k) ** -0.5)
    conv_bias = _randn(c_out, dtype=dtype) if conv_bias_on else None
    bn = _bn_params(c_out, dtype)
    out_h = (h + 2 * p - d * (k - 1) - 1) // s + 1
    out_w = (w + 2 * p - d * (k - 1) - 1) // s + 1
    residual = _randn(2, c_out, out_h, out_w, dtype=dtype, layout=layout) if residual_on else None
    folded = fold_conv_bn(weight, conv_bias, *bn[:2], *bn[2:], 1e-5, geometry, dtype)
    with torch.no_grad():
        out = triton_backend.conv_bias_act(x, folded, residual, relu)
        ref64 = _inference_unit(*_as64(x, weight, conv_bias), _as64(*bn), geometry, *_as64(residual), relu)
        stock = _inference_unit(x, weight, conv_bias, bn, geometry, residual, relu)
    assert out.dtype == dtype
    assert_tolerance(out, ref64, stock, name)
    return folded


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=[e[0] for e in EPILOGUES])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_bias_act(case, epilogue):
    _, residual_on, relu = epilogue
    layout = "nhwc" if CONV_CASES.index(case) % 2 else "nchw"  # both layouts, half the runs
    folded = _check_inference(case, residual_on, relu, layout)
    assert "triton" in folded.packed  # the packed weight is cached on the fold


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_conv_bias_act_layouts_and_conv_bias(layout):
    _check_inference(CONV_CASES[1], True, True, layout, conv_bias_on=True)


def test_conv_bias_act_vendor_path(monkeypatch):
    """The selector's other candidate: cuDNN/oneDNN conv + our bias/residual/ReLU epilogue kernel."""
    monkeypatch.setenv(select.MODE_ENV, "vendor")
    _check_inference(CONV_CASES[0], True, True, "nhwc")
    _check_inference(CONV_CASES[3], False, False, "nchw")


def test_conv_bias_act_packed_weight_is_reused():
    case = CONV_CASES[2]
    folded = _check_inference(case, False, True, "nchw")
    packed = folded.packed["triton"]
    x = _randn(2, case[1], case[3], case[4])
    with torch.no_grad():
        triton_backend.conv_bias_act(x, folded, None, True)
    assert folded.packed["triton"] is packed


def test_conv_bias_act_float64_and_autograd_use_reference():
    """No float64 kernel, and the inference kernel has no backward: both run the reference ops, correctly."""
    case = CONV_CASES[0]
    _check_inference(case, True, True, "nchw", dtype=torch.float64)
    x = _randn(2, 3, 9, 9).requires_grad_()
    weight = _randn(16, 3, 3, 3)
    bn = _bn_params(16)
    folded = fold_conv_bn(weight, None, *bn[:2], *bn[2:], 1e-5, ConvGeometry((1, 1), (1, 1)), torch.float32)
    out = triton_backend.conv_bias_act(x, folded, None, True)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# Gap: under the interpreter numpy has no bf16, so the kernel widens bf16 tiles to fp32 before tl.dot
# (exact products, same numerics as a bf16 MMA with fp32 accumulation); the bf16 tensor-core dot itself
# runs only in the cuda tests.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_conv_bias_act_half_precision(dtype):
    _check_inference(CONV_CASES[1], True, True, "nhwc", dtype=dtype)
    _check_inference(CONV_CASES[6], False, True, "nchw", dtype=dtype)


# Every GPU autotune config runs at least once, plus a small tile that splits M, N and K into
# several blocks (masked edges on all three) and exercises the grouped program ordering.
FORCED_CONFIGS = {f"gpu{i}-{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}": c
                  for i, c in enumerate(conv.GPU_CONFIGS)} if _REASON is None else {}
if _REASON is None:
    import triton as _triton

    FORCED_CONFIGS["small-16x16x16"] = _triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                                                      num_warps=2, num_stages=2)


@pytest.mark.parametrize("config_name", list(FORCED_CONFIGS))
def test_conv_forced_config(config_name, monkeypatch):
    """C_in 24 (K edge inside a 16/32 chunk), C_out 40 (several N blocks), M = 2*7*7 (several M blocks)."""
    monkeypatch.setattr(conv, "FORCED_CONFIG", FORCED_CONFIGS[config_name])
    case = ("forced", 24, 40, 7, 7, 3, 1, 1, 1, 1)
    _check_inference(case, True, True, "nhwc")
    _check_conv_stats(case, conv_bias_on=True)


def test_conv_stats_autotuning_leaves_no_stale_partial_rows(monkeypatch):
    """Autotuning runs configs with different BLOCK_M, each writing a different number of partial-statistics
    rows; the real autotuner's reset_to_zero must drop the losers' rows. Driven here with a fake clock that
    makes the last-benchmarked (shorter) config lose to the longer-tiled one."""
    import inspect
    import itertools

    import triton

    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        pytest.skip("this triton's autotune has no do_bench hook")
    clock = itertools.count(10.0, -1.0)

    def fake_bench(kernel_call, quantiles=None, **kwargs):
        kernel_call()
        elapsed = next(clock)
        return [elapsed, elapsed, elapsed] if quantiles else elapsed

    configs = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})
               for block_m in (16, 64)]
    tuned = triton.autotune(configs=configs, key=conv.AUTOTUNE_KEY, reset_to_zero=conv.STATS_RESET_TO_ZERO,
                            do_bench=fake_bench)(conv.conv2d_nhwc_kernel)
    monkeypatch.setattr(conv, "conv2d_nhwc_stats_autotuned", tuned)
    monkeypatch.setattr(_common, "interpreted", lambda: False)  # take the autotuned launch
    _check_conv_stats(("autotuned", 8, 16, 9, 9, 3, 1, 1, 1, 1))
    assert tuned.best_config.kwargs["BLOCK_M"] == 64


# --------------------------------------------------------------------------- statistics


def _check_conv_stats(case, conv_bias_on=False, dtype=torch.float32):
    _, c_in, c_out, h, w, k, s, p, d, g = case
    x = _randn(2, c_in, h, w, dtype=dtype)
    weight = _randn(c_out, c_in // g, k, k, dtype=dtype, scale=(c_in // g * k * k) ** -0.5)
    conv_bias = _randn(c_out, dtype=dtype, offset=3.0) if conv_bias_on else None
    with torch.no_grad():
        y, mean, var = conv.conv_stats(x, weight, conv_bias, (s, s), (p, p), (d, d), g)
        y64 = F.conv2d(*_as64(x, weight, conv_bias), (s, s), (p, p), (d, d), g)
        stock = F.conv2d(x, weight, conv_bias, (s, s), (p, p), (d, d), g)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_tolerance(y, y64, stock, "conv_stats y")
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    stock_var, stock_mean = torch.var_mean(stock.float(), dim=(0, 2, 3), correction=0)
    assert_tolerance(mean, mean64, stock_mean, "conv_stats mean")
    assert_tolerance(var, var64, stock_var, "conv_stats var")


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[6]], ids=lambda c: c[0])
def test_conv_stats(case):
    _check_conv_stats(case, conv_bias_on=True)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(3, 13, 7, 7), (2, 5, 9, 1), (2, 40, 15, 15)], ids=lambda s: "x".join(map(str, s)))
def test_batch_stats(shape, layout):
    """Large mean offset: sum/sum-of-squares would cancel; the Chan merge must not."""
    y = _randn(*shape, layout=layout, scale=2.0, offset=50.0)
    mean, var = bn_stats.batch_stats(y)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    stock_var, stock_mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    assert_tolerance(mean, mean64, stock_mean, "mean")
    assert_tolerance(var, var64, stock_var, "var")


def test_batch_stats_bf16():
    y = _randn(2, 13, 7, 7, dtype=torch.bfloat16, offset=3.0)
    mean, var = bn_stats.batch_stats(y)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    stock_var, stock_mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    assert_tolerance(mean, mean64, stock_mean, "mean")
    assert_tolerance(var, var64, stock_var, "var")


# --------------------------------------------------------------------------- training unit


def _train_reference(y, weight, bias, running_mean, running_var, residual, relu, momentum=0.1, eps=1e-5):
    out = F.batch_norm(y, running_mean, running_var, weight, bias, training=True, momentum=momentum, eps=eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _grads(out, inputs, grad_out):
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    return [None if t is None else next(grads) for t in inputs]


def _check_grads(names, got, ref64, stock):
    for name, g, r, s in zip(names, got, ref64, stock):
        if r is None:
            assert g is None, f"{name}: expected no gradient"
            continue
        assert_tolerance(g, r, s, f"grad {name}")


TRAIN_CASES = [
    ("c13-res-relu-affine", 13, 7, 7, True, True, True, "nchw"),
    ("c13-relu-nhwc", 13, 7, 7, False, True, True, "nhwc"),
    ("c16-res-norelu", 16, 5, 5, True, False, True, "nhwc"),
    ("c5-noaffine", 5, 9, 9, True, True, False, "nchw"),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bn_act_train_forward_backward_running_stats(case):
    _, channels, h, w, residual_on, relu, affine, layout = case
    y = _randn(2, channels, h, w, layout=layout, scale=2.0, offset=0.5)
    weight, bias, running_mean, running_var = _bn_params(channels)
    if not affine:
        weight = bias = None
    residual = _randn(2, channels, h, w, layout=layout) if residual_on else None
    grad_out = _randn(2, channels, h, w, layout=layout)

    inputs = _leaves(y, weight, bias, residual)
    ours_mean, ours_var = running_mean.clone(), running_var.clone()
    out = triton_backend.bn_act_train(inputs[0], inputs[1], inputs[2], ours_mean, ours_var, 0.1, 1e-5,
                                      inputs[3], relu)
    got = _grads(out, inputs, grad_out)

    inputs64 = _leaves(*_as64(y, weight, bias, residual))
    out64 = _train_reference(inputs64[0], inputs64[1], inputs64[2], running_mean.double(), running_var.double(),
                             inputs64[3], relu)
    ref64 = _grads(out64, inputs64, grad_out.double())

    inputs32 = _leaves(y, weight, bias, residual)
    stock_mean, stock_var = running_mean.clone(), running_var.clone()
    stock_out = _train_reference(inputs32[0], inputs32[1], inputs32[2], stock_mean, stock_var, inputs32[3], relu)
    stock = _grads(stock_out, inputs32, grad_out)

    assert_tolerance(out, out64, stock_out, "out")
    _check_grads(["y", "weight", "bias", "residual"], got, ref64, stock)
    # nn.BatchNorm2d's running-stat update (unbiased variance, momentum).
    module = torch.nn.BatchNorm2d(channels, affine=affine).to(DEVICE)
    module.running_mean.copy_(running_mean)
    module.running_var.copy_(running_var)
    module(y)
    torch.testing.assert_close(ours_mean, module.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_var, module.running_var, rtol=1e-5, atol=1e-6)


def test_bn_act_train_without_running_stats_bf16():
    y = _randn(2, 13, 7, 7, dtype=torch.bfloat16, layout="nhwc")
    weight, bias, _, _ = _bn_params(13, torch.bfloat16)
    residual = _randn(2, 13, 7, 7, dtype=torch.bfloat16, layout="nhwc")
    grad_out = _randn(2, 13, 7, 7, dtype=torch.bfloat16, layout="nhwc")
    inputs = _leaves(y, weight, bias, residual)
    out = triton_backend.bn_act_train(*inputs[:3], None, None, 0.1, 1e-5, inputs[3], True)
    got = _grads(out, inputs, grad_out)
    inputs64 = _leaves(*_as64(y, weight, bias, residual))
    out64 = _train_reference(inputs64[0], inputs64[1], inputs64[2], None, None, inputs64[3], True)
    ref64 = _grads(out64, inputs64, grad_out.double())
    inputs16 = _leaves(y, weight, bias, residual)
    stock_out = _train_reference(inputs16[0], inputs16[1], inputs16[2], None, None, inputs16[3], True)
    stock = _grads(stock_out, inputs16, grad_out)
    assert out.dtype == torch.bfloat16
    assert_tolerance(out, out64, stock_out, "out")
    _check_grads(["y", "weight", "bias", "residual"], got, ref64, stock)


def test_bn_act_backward_without_residual_grad():
    """residual given but not requiring grad: the kernel skips writing grad_residual."""
    y = _randn(2, 13, 5, 5).requires_grad_()
    residual = _randn(2, 13, 5, 5)
    out = triton_backend.bn_act_train(y, None, None, None, None, 0.1, 1e-5, residual, True)
    (grad_y,) = torch.autograd.grad(out.sum(), [y])
    y64 = y.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(_train_reference(y64, None, None, None, None, residual.double(), True).sum(), [y64])
    y32 = y.detach().clone().requires_grad_()
    (stock,) = torch.autograd.grad(_train_reference(y32, None, None, None, None, residual, True).sum(), [y32])
    assert_tolerance(grad_y, ref, stock, "grad y")


TRAIN_CONV_CASES = [CONV_CASES[1], CONV_CASES[3], CONV_CASES[7]]


@pytest.mark.parametrize("path", ["triton", "vendor"])
@pytest.mark.parametrize("case", TRAIN_CONV_CASES, ids=lambda c: c[0])
def test_conv_bn_act_train(case, path, monkeypatch):
    """Conv (+bias) with statistics from the epilogue (or vendor conv + stats kernel), BN, residual, ReLU:
    output, every gradient (conv backward via aten.convolution_backward) and the running stats."""
    monkeypatch.setenv(select.MODE_ENV, path)
    _, c_in, c_out, h, w, k, s, p, d, g = case
    geometry = ConvGeometry((s, s), (p, p), (d, d), g)
    layout = "nhwc" if path == "triton" else "nchw"
    x = _randn(2, c_in, h, w, layout=layout)
    weight = _randn(c_out, c_in // g, k, k, scale=(c_in // g * k * k) ** -0.5)
    conv_bias = _randn(c_out, offset=1.0)
    bn_weight, bn_bias, running_mean, running_var = _bn_params(c_out)
    out_h = (h + 2 * p - d * (k - 1) - 1) // s + 1
    out_w = (w + 2 * p - d * (k - 1) - 1) // s + 1
    residual = _randn(2, c_out, out_h, out_w, layout=layout)
    grad_out = _randn(2, c_out, out_h, out_w)

    def stock_unit(x, weight, conv_bias, bn_weight, bn_bias, residual, rm, rv):
        y = F.conv2d(x, weight, conv_bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
        return _train_reference(y, bn_weight, bn_bias, rm, rv, residual, True)

    names = ["x", "weight", "conv_bias", "bn_weight", "bn_bias", "residual"]
    tensors = (x, weight, conv_bias, bn_weight, bn_bias, residual)
    inputs = _leaves(*tensors)
    ours_mean, ours_var = running_mean.clone(), running_var.clone()
    out = triton_backend.conv_bn_act_train(inputs[0], inputs[1], inputs[2], geometry, inputs[3], inputs[4],
                                           ours_mean, ours_var, 0.1, 1e-5, inputs[5], True)
    got = _grads(out, inputs, grad_out)
    inputs64 = _leaves(*_as64(*tensors))
    mean64, var64 = running_mean.double(), running_var.double()
    out64 = stock_unit(*inputs64, mean64, var64)
    ref64 = _grads(out64, inputs64, grad_out.double())
    inputs32 = _leaves(*tensors)
    stock_mean, stock_var = running_mean.clone(), running_var.clone()
    stock_out = stock_unit(*inputs32, stock_mean, stock_var)
    stock = _grads(stock_out, inputs32, grad_out)

    assert_tolerance(out, out64, stock_out, "out")
    _check_grads(names, got, ref64, stock)
    assert_tolerance(ours_mean, mean64, stock_mean, "running_mean")
    assert_tolerance(ours_var, var64, stock_var, "running_var")


def test_ops_layer_dispatches_to_triton():
    """resnet_fast.conv_bn_act(backend='triton'), eval (folded) and train (num_batches_tracked, momentum=None)."""
    x = _randn(2, 8, 7, 7)
    weight = _randn(13, 8, 3, 3, scale=0.2)
    bn_weight, bn_bias, running_mean, running_var = _bn_params(13)
    residual = _randn(2, 13, 7, 7)
    kwargs = dict(padding=1, residual=residual, relu=True)
    with torch.no_grad():
        out = resnet_fast.conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, backend="triton",
                                      **kwargs)
        ref = resnet_fast.conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                      backend="reference", **kwargs)
        ref64 = resnet_fast.conv_bn_act(*_as64(x, weight, bn_weight, bn_bias, running_mean, running_var),
                                        backend="reference", padding=1, residual=residual.double(), relu=True)
    assert_tolerance(out, ref64, ref, "eval")
    stats = [running_mean.clone(), running_var.clone()]
    tracked = torch.zeros((), dtype=torch.long, device=DEVICE)
    ref_stats = [running_mean.clone(), running_var.clone()]
    ref_tracked = torch.zeros((), dtype=torch.long, device=DEVICE)
    out = resnet_fast.conv_bn_act(x, weight, bn_weight, bn_bias, *stats, training=True, momentum=None,
                                  num_batches_tracked=tracked, backend="triton", **kwargs)
    ref = resnet_fast.conv_bn_act(x, weight, bn_weight, bn_bias, *ref_stats, training=True, momentum=None,
                                  num_batches_tracked=ref_tracked, backend="reference", **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
    assert int(tracked) == 1


# --------------------------------------------------------------------------- NaN and Inf
#
# NaN and Inf propagate exactly as in the stock layers: relu(NaN) = NaN, relu's backward is
# threshold_backward(grad, out, 0) (the grad passes where out is NaN), BN statistics as F.batch_norm's
# (CPU) sum / count. Compared with the reference backend / torch: the same NaN and +-Inf positions,
# the finite values close. Triton 3.8's interpreter lowers tl.maximum's default (maxnum) to np.fmax,
# which drops NaN as the GPU does, so these tests see a bare tl.maximum; the source guard below covers
# interpreters that would not.

NAN, INF = float("nan"), float("inf")


def _assert_same_nonfinite(got, ref, name, rtol=1e-4, atol=1e-5):
    """NaN exactly where ``ref`` is NaN, the same +-Inf, and the finite values close."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    for what, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        mismatch = test(got) != test(ref)
        if mismatch.any():
            where = [int(i) for i in mismatch.nonzero()[0]]
            raise AssertionError(f"{name}: {what} positions differ at {int(mismatch.sum())} elements (first at "
                                 f"{where}: got {got[tuple(where)].item()}, reference {ref[tuple(where)].item()})")
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _place(t, values):
    """``t`` with ``t[index] = value`` for each ``(index, value)``: NaN/Inf at chosen elements."""
    t = t.clone()
    for index, value in values:
        t[index] = value
    return t


def test_bias_act_keeps_nan_and_inf():
    """Inference epilogue after a vendor conv (bias + residual + ReLU) with NaN/+-Inf in y, bias and residual."""
    y = _place(_randn(2, 6, 3, 3), [((0, 0, 0, 0), NAN), ((1, 0, 2, 1), -INF), ((0, 1, 1, 1), INF),
                                    ((1, 2, 0, 2), -INF), ((0, 3, 2, 2), INF), ((1, 5, 1, 0), NAN)])
    bias = _place(_randn(6), [(4, INF), (5, -INF)])
    residual = _place(_randn(2, 6, 3, 3), [((0, 0, 1, 2), NAN), ((1, 2, 0, 2), NAN), ((0, 3, 2, 2), -INF),
                                           ((1, 1, 0, 0), INF), ((0, 1, 0, 1), -INF)])
    for layout in ("nchw", "nhwc"):
        y_l, residual_l = (t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t
                           for t in (y, residual))
        with torch.no_grad():
            out = bn_act.bias_act(y_l, bias, residual_l, True)
            plain = bn_act.bias_act(y_l, bias, None, False)
        _assert_same_nonfinite(out, torch.relu(y + bias.view(1, -1, 1, 1) + residual), f"relu out ({layout})")
        _assert_same_nonfinite(plain, y + bias.view(1, -1, 1, 1), f"plain out ({layout})")


def test_conv_bias_act_keeps_nan_and_inf():
    """The conv kernel's epilogue: NaN/+-Inf in x, the weight and the residual (1x1, no padding taps, so
    where a NaN/Inf lands does not depend on how a conv implementation treats 0 * Inf at the border)."""
    x = _place(_randn(2, 8, 5, 5), [((0, 2, 1, 3), NAN), ((1, 4, 4, 0), INF)])
    weight = _place(_randn(13, 8, 1, 1, scale=8 ** -0.5), [((1, 2, 0, 0), NAN), ((3, 0, 0, 0), INF),
                                                           ((4, 5, 0, 0), -INF)])
    bias = _randn(13)
    residual = _place(_randn(2, 13, 5, 5), [((0, 6, 2, 2), NAN), ((1, 7, 0, 1), INF), ((0, 8, 3, 3), -INF)])
    packed = conv.pack_weight(weight, 1)
    with torch.no_grad():
        out = conv.conv_bias_act(x, packed, bias, residual, (1, 1), (0, 0), (1, 1), True)
        plain = conv.conv_bias_act(x, packed, bias, None, (1, 1), (0, 0), (1, 1), False)
        stock = F.conv2d(x, weight, bias)
    _assert_same_nonfinite(out, torch.relu(stock + residual), "relu out")
    _assert_same_nonfinite(plain, stock, "plain out")


def test_bn_act_backward_passes_grad_where_out_is_nan():
    """The backward kernels alone, on a given ``out``: g = threshold_backward(grad_out, out, 0), so a NaN ``out``
    passes the grad, ``out <= 0`` (-0.0 included) blocks it even when the grad is NaN, +Inf passes it."""
    y = _randn(2, 5, 4, 4, scale=2.0)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    weight = _randn(5, scale=0.5, offset=1.0)
    # Channel 0: NaN out (grad passes, results finite); 1: NaN grad where out == 0 (blocked); 2: NaN grad where
    # out > 0 (passed: the channel's grad_y and grad_weight are NaN); 3: out +Inf (passes) and -0.0 (blocks).
    out = _place(torch.relu(_randn(2, 5, 4, 4)), [((0, 0, 1, 1), NAN), ((1, 0, 3, 2), NAN), ((1, 1, 2, 2), 0.0),
                                                  ((0, 2, 0, 3), 1.0), ((0, 3, 2, 0), INF), ((1, 3, 0, 0), -0.0)])
    grad_out = _place(_randn(2, 5, 4, 4), [((1, 1, 2, 2), NAN), ((0, 2, 0, 3), NAN)])
    grad_y, grad_weight, grad_bias, grad_residual = bn_act.bn_act_backward_op(
        grad_out, out, y, mean, var, weight, 1e-5, True, True)

    g = torch.ops.aten.threshold_backward(grad_out.double(), out.double(), 0.0)
    shape = (1, -1, 1, 1)
    count = y.numel() // y.shape[1]
    invstd = torch.rsqrt(var.double() + 1e-5)
    centered = y.double() - mean.double().view(shape)
    sum_g, sum_gc = g.sum(dim=(0, 2, 3)), (g * centered).sum(dim=(0, 2, 3))
    ref_grad_y = (weight.double() * invstd).view(shape) * (
        g - (sum_g / count).view(shape) - centered * (invstd * invstd * sum_gc / count).view(shape))
    _assert_same_nonfinite(grad_residual, g, "grad residual")
    _assert_same_nonfinite(grad_bias, sum_g, "grad bias")
    _assert_same_nonfinite(grad_weight, sum_gc * invstd, "grad weight")
    _assert_same_nonfinite(grad_y, ref_grad_y, "grad y")


# (id, places in y, places in the residual) on a (2, 6, 4, 4) batch. y[0, c, 0, 0] is the shift of the statistics
# pass; image 0 and image 1 fall in different row tiles.
_NONFINITE_Y = [((0, 0, 1, 2), NAN), ((0, 1, 0, 0), INF), ((1, 1, 3, 3), INF), ((0, 2, 0, 0), -INF),
                ((0, 3, 2, 1), INF), ((1, 3, 1, 2), -INF)]
_NONFINITE_RESIDUAL = [((1, 4, 2, 2), NAN), ((0, 5, 1, 1), INF), ((1, 5, 3, 3), -INF), ((0, 4, 0, 3), -INF)]


@pytest.mark.parametrize("split", ["default", "one-program"])
def test_batch_stats_nan_and_inf(split, monkeypatch):
    """Per channel: NaN anywhere -> NaN mean; +-Inf (also as the shift y[0, c, 0, 0]) -> +-Inf mean; both
    infinities -> NaN mean; variance NaN for all of them, as F.batch_norm's sum / count. ``one-program``
    makes one program walk both row tiles, so the in-kernel merge meets an infinite mean."""
    if split == "one-program":
        monkeypatch.setattr(bn_stats, "_split_rows", lambda total_rows, channel_blocks, block_m: total_rows)
    y = _place(_randn(2, 6, 4, 4, offset=3.0), _NONFINITE_Y + [((1, 4, 0, 0), INF)])
    mean, var = bn_stats.batch_stats(y)
    var64, _ = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    _assert_same_nonfinite(mean, y.double().mean(dim=(0, 2, 3)), "mean")
    _assert_same_nonfinite(var, var64, "var")


def test_conv_stats_nan_inf_and_huge_channels():
    """Statistics from the conv epilogue, merged over partial rows of which some stay empty: an Inf input pixel
    gives +-Inf means (NaN where 0 * Inf), a finite mean of 3e19 (delta**2 overflows float32) a finite
    variance. Two groups, so the Inf reaches only output channels 0..2."""
    x = _place(_randn(2, 4, 12, 12), [((1, 0, 5, 7), INF)])
    weight = _place(_randn(6, 2, 1, 1, scale=0.5), [((2, 0, 0, 0), 0.0), ((5, 0, 0, 0), 0.0), ((5, 1, 0, 0), 0.0)])
    bias = _place(_randn(6), [(5, 3e19)])
    with torch.no_grad():
        y, mean, var = conv.conv_stats(x, weight, bias, (1, 1), (0, 0), (1, 1), 2)
        stock = F.conv2d(x, weight, bias, groups=2)
    _assert_same_nonfinite(y, stock, "y")
    var64, _ = torch.var_mean(stock.double(), dim=(0, 2, 3), correction=0)
    _assert_same_nonfinite(mean, stock.double().mean(dim=(0, 2, 3)), "mean")
    _assert_same_nonfinite(var[:5], var64[:5], "var")
    assert torch.isinf(mean[:2]).all() and torch.isnan(mean[2]) and torch.isfinite(mean[3:]).all()
    # Channel 5 is the constant 3e19: its variance is 0 up to float32 rounding of the mean (ulp 2.2e12).
    assert torch.isfinite(var[5]) and 0.0 <= var[5].item() < (1e-5 * 3e19) ** 2, f"var of the 3e19 channel: {var[5]}"


def _assert_train_step_matches(out, grads, stats, ref_out, ref_grads, ref_stats, names) -> None:
    """Output, every gradient and the running statistics have the reference's non-finite pattern."""
    _assert_same_nonfinite(out, ref_out, "out")
    for name, g, r in zip(names, grads, ref_grads):
        _assert_same_nonfinite(g, r, f"grad {name}")
    _check_running_stats(stats[0], ref_stats[0], "running_mean")
    _check_running_stats(stats[1], ref_stats[1], "running_var")


def _check_running_stats(ours, ref, name):
    if DEVICE == "cpu":
        _assert_same_nonfinite(ours, ref, name)
    else:
        # CUDA's F.batch_norm merges its statistics with Welford's update, whose mean is NaN where a sum's is
        # +-Inf: only finiteness is comparable there.
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref)), f"{name}: {ours} vs {ref}"


def test_bn_act_train_keeps_nan_and_inf():
    """Training BN + residual + ReLU, forward, backward and running stats, vs the reference backend: NaN/+-Inf in y
    (whole channel NaN, the grad still passes to the bias and the residual) and in the residual (one element)."""
    from resnet_fast.ops import reference

    y = _place(_randn(2, 6, 4, 4, offset=0.5), _NONFINITE_Y)
    weight, bias, running_mean, running_var = _bn_params(6)
    residual = _place(_randn(2, 6, 4, 4), _NONFINITE_RESIDUAL)
    grad_out = _randn(2, 6, 4, 4)
    names = ["y", "weight", "bias", "residual"]

    inputs = _leaves(y, weight, bias, residual)
    ours_stats = [running_mean.clone(), running_var.clone()]
    out = triton_backend.bn_act_train(*inputs[:3], *ours_stats, 0.1, 1e-5, inputs[3], True)
    got = _grads(out, inputs, grad_out)
    ref_inputs = _leaves(y, weight, bias, residual)
    ref_stats = [running_mean.clone(), running_var.clone()]
    ref_out = reference.bn_act_train(*ref_inputs[:3], *ref_stats, 0.1, 1e-5, ref_inputs[3], True)
    ref = _grads(ref_out, ref_inputs, grad_out)

    _assert_train_step_matches(out, got, ours_stats, ref_out, ref, ref_stats, names)


@pytest.mark.parametrize("path", ["triton", "vendor"])
def test_conv_bn_act_train_keeps_nan_and_inf(path, monkeypatch):
    """Training conv + BN + residual + ReLU vs the reference backend: NaN and +-Inf in the weight (1x1 conv, no
    padding taps) and in the residual; forward, every gradient and the running stats."""
    from resnet_fast.ops import reference

    monkeypatch.setenv(select.MODE_ENV, path)
    geometry = ConvGeometry((1, 1), (0, 0), (1, 1), 1)
    x = _randn(2, 8, 5, 5, layout="nhwc")
    weight = _place(_randn(13, 8, 1, 1, scale=8 ** -0.5), [((1, 2, 0, 0), NAN), ((3, 0, 0, 0), INF),
                                                           ((4, 5, 0, 0), -INF)])
    conv_bias = _randn(13, offset=1.0)
    bn_weight, bn_bias, running_mean, running_var = _bn_params(13)
    residual = _place(_randn(2, 13, 5, 5, layout="nhwc"),
                      [((0, 6, 2, 2), NAN), ((1, 7, 0, 1), INF), ((0, 8, 3, 3), -INF), ((1, 8, 1, 1), -INF)])
    grad_out = _randn(2, 13, 5, 5)
    names = ["x", "weight", "conv_bias", "bn_weight", "bn_bias", "residual"]
    tensors = (x, weight, conv_bias, bn_weight, bn_bias, residual)

    inputs = _leaves(*tensors)
    ours_stats = [running_mean.clone(), running_var.clone()]
    out = triton_backend.conv_bn_act_train(inputs[0], inputs[1], inputs[2], geometry, inputs[3], inputs[4],
                                           *ours_stats, 0.1, 1e-5, inputs[5], True)
    got = _grads(out, inputs, grad_out)
    ref_inputs = _leaves(*tensors)
    ref_stats = [running_mean.clone(), running_var.clone()]
    y = reference.conv2d(ref_inputs[0], ref_inputs[1], ref_inputs[2], geometry)
    ref_out = reference.bn_act_train(y, ref_inputs[3], ref_inputs[4], *ref_stats, 0.1, 1e-5, ref_inputs[5], True)
    ref = _grads(ref_out, ref_inputs, grad_out)

    _assert_train_step_matches(out, got, ours_stats, ref_out, ref, ref_stats, names)


_TRITON_DIR = os.path.join(os.path.dirname(resnet_fast.__file__), "ops", "triton")


def _is_zero(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and node.value == 0


def _nan_hazard(call: ast.Call) -> bool:
    """``tl.maximum/minimum(x, 0)`` without ``propagate_nan=ALL``, or ``tl.where(x > 0, ...)`` / ``(0 < x, ...)``."""
    name = ast.unparse(call.func)
    if name in ("tl.maximum", "tl.minimum"):
        keeps_nan = any(k.arg == "propagate_nan" and ast.unparse(k.value).endswith("PropagateNan.ALL")
                        for k in call.keywords)
        return any(_is_zero(arg) for arg in call.args) and not keeps_nan
    if name == "tl.where" and call.args and isinstance(call.args[0], ast.Compare):
        test = call.args[0]
        op, right = test.ops[0], test.comparators[0]
        return (isinstance(op, (ast.Gt, ast.GtE)) and _is_zero(right)) or (
            isinstance(op, (ast.Lt, ast.LtE)) and _is_zero(test.left))
    return False


def test_kernels_have_no_nan_dropping_relu():
    """Source guard: the interpreter need not show how a GPU lowers tl.maximum, so no kernel may hold a bare
    ``tl.maximum(x, 0.0)`` or ``tl.where(x > 0, g, 0)``, and every ``ACTIVATION == "relu"`` branch applies
    bn_act's relu_keep_nan / relu_grad (the one definition of torch.relu's NaN semantics)."""
    helpers = {"relu_keep_nan", "relu_grad"}
    for name in sorted(os.listdir(_TRITON_DIR)):
        if not name.endswith(".py"):
            continue
        path = f"resnet_fast/ops/triton/{name}"
        with open(os.path.join(_TRITON_DIR, name)) as source:
            tree = ast.parse(source.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _nan_hazard(node):
                raise AssertionError(
                    f"{path}:{node.lineno}: {ast.unparse(node)} drops NaN: tl.maximum(x, 0) is a maxnum (0 for a NaN "
                    "x on the GPU, whatever the interpreter shows) and tl.where(x > 0, g, 0) drops the grad where "
                    "x is NaN; use bn_act.relu_keep_nan(x) / bn_act.relu_grad(g, out) (torch.relu semantics)")
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) == "ACTIVATION == 'relu'":
                called = {ast.unparse(n.func).split(".")[-1] for b in node.body for n in ast.walk(b)
                          if isinstance(n, ast.Call)}
                assert called & helpers, (
                    f"{path}:{node.lineno}: this relu branch applies neither relu_keep_nan nor relu_grad, the one "
                    f"NaN-keeping definition of torch.relu and its backward (it calls {sorted(called)})")


# --------------------------------------------------------------------------- whole model


def _model_pair():
    torch.manual_seed(1)
    fast = resnet_fast.resnet18(num_classes=10, small_input=True).to(DEVICE)
    with torch.no_grad():
        for module in fast.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    reference = resnet_fast.resnet18(num_classes=10, small_input=True).to(DEVICE)
    reference.load_state_dict(fast.state_dict())
    return fast.set_backend("triton"), reference.set_backend("reference")


def test_resnet18_eval_and_train_step():
    """FastResNet on the triton backend vs the reference backend: eval logits, then one SGD step
    (loss, every parameter after the step, every BN buffer)."""
    fast, reference = _model_pair()
    x = _randn(2, 3, 16, 16)
    target = torch.tensor([3, 7], device=DEVICE)
    fast.eval()
    reference.eval()
    with torch.no_grad():
        logits = fast(x)
        ref_logits = reference(x)
        ref64 = reference.double()(x.double())
    reference.float()
    assert_tolerance(logits, ref64, ref_logits, "eval logits")

    fast.train()
    reference.train()
    losses = []
    for model in (fast, reference):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    for (name, p_fast), p_ref in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_fast, p_ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    for (name, b_fast), b_ref in zip(fast.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- selector


def test_selector_does_nothing_without_cuda(monkeypatch):
    monkeypatch.setenv(select.MODE_ENV, "measure")
    calls = []
    candidates = {"triton": lambda: calls.append("t"), "vendor": lambda: calls.append("v")}
    if DEVICE == "cpu":
        assert select.choose("k", candidates, torch.device("cpu")) == "triton"
        assert calls == []  # nothing timed, nothing run
    monkeypatch.setenv(select.MODE_ENV, "vendor")
    assert select.choose("k", candidates, torch.device(DEVICE)) == "vendor"
    monkeypatch.setenv(select.MODE_ENV, "fastest-please")
    with pytest.raises(ValueError, match="RESNET_FAST_TRITON_SELECT"):
        select.choose("k", candidates, torch.device(DEVICE))


def test_selector_measures_once_and_persists(monkeypatch, tmp_path):
    """Timing logic with a fake clock: the faster candidate wins, is cached, and survives a restart on disk."""
    monkeypatch.setenv(select.MODE_ENV, "measure")
    monkeypatch.setenv(select.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(select, "_timeable_device", lambda device: True)
    monkeypatch.setattr(select, "_capturing", lambda: False)
    fake_ms = {"triton": 2.0, "vendor": 1.0}
    timed = []

    def fake_time(fn):
        timed.append(fn())
        return fake_ms[timed[-1]]

    monkeypatch.setattr(select, "_time_ms", fake_time)
    select.clear()
    candidates = {"triton": lambda: "triton", "vendor": lambda: "vendor"}
    try:
        assert select.choose("layer-a", candidates, torch.device(DEVICE)) == "vendor"
        assert select.choose("layer-a", candidates, torch.device(DEVICE)) == "vendor"
        assert timed == ["triton", "vendor"]
        assert select.measured()["layer-a"] == fake_ms
        assert "layer-a" in select.cache_path().read_text()
        select.clear()  # a new process: the disk cache answers, no timing
        assert select.choose("layer-a", candidates, torch.device(DEVICE)) == "vendor"
        assert timed == ["triton", "vendor"]
    finally:
        select.clear()


# --------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", [
    ("r50-layer1-3x3", 64, 64, 56, 56, 3, 1, 1, 1, 1),
    ("r50-layer2-1x1-s2", 256, 512, 56, 56, 1, 2, 0, 1, 1),
    ("r50-layer3-3x3-s2", 256, 256, 28, 28, 3, 2, 1, 1, 1),
    ("r50-stem", 3, 64, 64, 64, 7, 2, 3, 1, 1),
    ("resnext-3x3-g32", 256, 256, 28, 28, 3, 1, 1, 1, 32),
], ids=lambda c: c[0])
def test_cuda_autotuned_conv(case, dtype, monkeypatch):
    """Autotuned kernel (no forced config) at ResNet-50 shapes, batch 8, channels_last."""
    monkeypatch.setenv(conv.AUTOTUNE_ENV, "full")  # even where the GPU check turns tuning off for speed
    _, c_in, c_out, h, w, k, s, p, d, g = case
    geometry = ConvGeometry((s, s), (p, p), (d, d), g)
    x = _randn(8, c_in, h, w, dtype=dtype, layout="nhwc")
    weight = _randn(c_out, c_in // g, k, k, dtype=dtype, scale=(c_in // g * k * k) ** -0.5)
    bn = _bn_params(c_out, dtype)
    out_h = (h + 2 * p - k) // s + 1
    out_w = (w + 2 * p - k) // s + 1
    residual = _randn(8, c_out, out_h, out_w, dtype=dtype, layout="nhwc")
    folded = fold_conv_bn(weight, None, *bn[:2], *bn[2:], 1e-5, geometry, dtype)
    with torch.no_grad():
        out = triton_backend.conv_bias_act(x, folded, residual, True)
        ref64 = _inference_unit(*_as64(x, weight, None), _as64(*bn), geometry, *_as64(residual), True)
        stock = _inference_unit(x, weight, None, bn, geometry, residual, True)
    assert_tolerance(out, ref64, stock, "output")


@pytest.mark.cuda
def test_cuda_tf32_follows_the_convolution_flag(monkeypatch):
    """fp32 without TF32 is IEEE-exact-ish; with cuDNN's convolutions allowed TF32 the Triton conv may use it."""
    case = ("tf32", 256, 256, 14, 14, 3, 1, 1, 1, 1)
    _check_inference(case, False, False, "nhwc")  # allow_tf32 is off in tests: fp32 tolerance holds
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    x = _randn(2, 256, 14, 14, layout="nhwc")
    weight = _randn(256, 256, 3, 3, scale=(256 * 9) ** -0.5)
    packed = conv.pack_weight(weight, 1)
    out = conv.conv_bias_act(x, packed, None, None, (1, 1), (1, 1), (1, 1), False)
    ref = F.conv2d(x.double(), weight.double(), None, 1, 1)
    assert (out.double() - ref).abs().max().item() < 5e-2  # TF32: 10-bit mantissa products


@pytest.mark.cuda
def test_cuda_selector_times_and_caches(monkeypatch, tmp_path):
    monkeypatch.setenv(select.MODE_ENV, "measure")
    monkeypatch.setenv(select.CACHE_DIR_ENV, str(tmp_path))
    select.clear()
    try:
        case = ("sel", 64, 64, 28, 28, 3, 1, 1, 1, 1)
        _check_inference(case, True, True, "nhwc", dtype=torch.bfloat16)
        measured = select.measured()
        assert len(measured) == 1
        (timings,) = measured.values()
        assert set(timings) == {"triton", "vendor"} and all(t > 0 for t in timings.values())
        _check_inference(case, True, True, "nhwc", dtype=torch.bfloat16)  # cached: no second timing
        assert select.measured() == measured
    finally:
        select.clear()


@pytest.mark.cuda
def test_cuda_resnet50_bf16_channels_last_inference():
    torch.manual_seed(0)
    fast = resnet_fast.resnet50(num_classes=100).to(DEVICE).eval()
    reference = resnet_fast.resnet50(num_classes=100).to(DEVICE).eval()
    reference.load_state_dict(fast.state_dict())
    x = _randn(8, 3, 128, 128, layout="nhwc")
    with torch.no_grad():
        ref64 = reference.double()(x.double())
        stock = reference.to(torch.bfloat16).set_backend("reference")(x.bfloat16())
        out = fast.to(torch.bfloat16).to(memory_format=torch.channels_last).set_backend("triton")(x.bfloat16())
    assert_tolerance(out, ref64, stock, "resnet50 bf16 logits", factor=3.0)


@pytest.mark.cuda
def test_cuda_compile_fullgraph_traces_triton_ops():
    if not _common.HAS_TRITON_OP:
        pytest.skip("torch.library.triton_op needs torch >= 2.6")
    x = _randn(2, 16, 9, 9, layout="nhwc")
    weight = _randn(16, 16, 3, 3, scale=0.1)
    packed = conv.pack_weight(weight, 1)
    bias = _randn(16)

    def unit(x):
        return conv.conv_bias_act(x, packed, bias, None, (1, 1), (1, 1), (1, 1), True)

    compiled = torch.compile(unit, fullgraph=True)
    torch.testing.assert_close(compiled(x), unit(x))
