"""The functional unit ``conv_bn_act``: reference vs stock layers, each backend vs float64, compile, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from resnet_fast import backends
from resnet_fast.ops import conv_bn_act
from tests.numerics import assert_tolerance

CPU_BACKENDS = [name for name in ("reference", "extension") if backends.is_available(name, "cpu")]

# (in_channels, out_channels, kernel, stride, padding, dilation, groups, spatial)
CASES = {
    "3x3-s1-c13": (13, 13, 3, 1, 1, 1, 1, 7),
    "3x3-s2-c3to8": (3, 8, 3, 2, 1, 1, 1, 9),
    "1x1-s2-c8to13": (8, 13, 1, 2, 0, 1, 1, 7),
    "7x7-s2-stem": (3, 8, 7, 2, 3, 1, 1, 13),
    "3x3-dil2-g2": (8, 6, 3, 1, 2, 2, 2, 9),
}


def _unit(case: str, generator: torch.Generator):
    cin, cout, k, stride, padding, dilation, groups, size = CASES[case]
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(cout, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(cout, generator=generator))
        bn.running_mean.copy_(torch.randn(cout, generator=generator))
        bn.running_var.copy_(torch.rand(cout, generator=generator) + 0.5)
    x = torch.randn(3, cin, size, size, generator=generator)
    out_size = conv(x).shape[-1]
    residual = torch.randn(3, cout, out_size, out_size, generator=generator)
    return conv, bn, x, residual


def _stock(conv, bn, x, residual, relu):
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _fused(conv, bn, x, residual, relu, backend, training):
    return conv_bn_act(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                       stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                       eps=bn.eps, momentum=bn.momentum, training=training, residual=residual, relu=relu,
                       num_batches_tracked=bn.num_batches_tracked if training else None, backend=backend)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_stock_layers_in_float64(case, training):
    conv, bn, x, residual = _unit(case, torch.Generator().manual_seed(0))
    conv, bn, x, residual = conv.double(), bn.double(), x.double(), residual.double()
    bn_copy = copy.deepcopy(bn)
    bn.train(training), bn_copy.train(training)
    for res in (None, residual):
        for relu in (False, True):
            out = _fused(conv, bn, x, res, relu, "reference", training)
            expected = _stock(conv, bn_copy, x, res, relu)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, bn_copy.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, bn_copy.running_var, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == int(bn_copy.num_batches_tracked)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_float64_reference(backend, case, training, dtype, layout):
    conv, bn, x, residual = _unit(case, torch.Generator().manual_seed(1))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, residual = x.contiguous(memory_format=fmt), residual.contiguous(memory_format=fmt)
    for res, relu in [(None, True), (residual, True), (residual, False)]:
        conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double().train(training)
        ref64 = _stock(conv64, bn64, x.double(), None if res is None else res.double(), relu)
        stock_conv, stock_bn = copy.deepcopy(conv).to(dtype), copy.deepcopy(bn).train(training)
        stock_x, stock_res = x.to(dtype), None if res is None else res.to(dtype)
        stock = _stock(stock_conv, stock_bn, stock_x, stock_res, relu)
        fused_conv, fused_bn = copy.deepcopy(conv).to(dtype), copy.deepcopy(bn).train(training)
        out = _fused(fused_conv, fused_bn, stock_x, stock_res, relu, backend, training)
        label = f"{backend} {case} {'train' if training else 'eval'} residual={res is not None} relu={relu}"
        assert out.dtype == dtype, f"{label}: output dtype {out.dtype}, expected {dtype}"
        assert_tolerance(out, ref64, stock, label)
        if training:
            assert_tolerance(fused_bn.running_var, bn64.running_var, stock_bn.running_var, f"{label} running_var")
            assert_tolerance(fused_bn.running_mean, bn64.running_mean, stock_bn.running_mean,
                             f"{label} running_mean")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_gradients_match_float64(backend):
    conv, bn, x, residual = _unit("3x3-s2-c3to8", torch.Generator().manual_seed(2))
    grad = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(3))
    results = {}
    for key, dtype, name in [("ref64", torch.float64, "reference"), ("stock", torch.float32, None),
                             ("fused", torch.float32, backend)]:
        c, b = copy.deepcopy(conv).to(dtype), copy.deepcopy(bn).to(dtype).train()
        xx = x.to(dtype).requires_grad_()
        rr = residual.to(dtype).requires_grad_()
        out = _stock(c, b, xx, rr, True) if name is None else _fused(c, b, xx, rr, True, name, True)
        out.backward(grad.to(dtype))
        results[key] = {"x": xx.grad, "residual": rr.grad, "conv.weight": c.weight.grad,
                        "bn.weight": b.weight.grad, "bn.bias": b.bias.grad}
    for name, value in results["fused"].items():
        assert_tolerance(value, results["ref64"][name], results["stock"][name], f"{backend} grad of {name}")


def test_gradcheck_reference_unit():
    generator = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    g = torch.rand(4, generator=generator, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 4, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def unit(x, w, g, b, residual):
        return conv_bn_act(x, w, g, b, None, None, padding=1, training=True, residual=residual,
                           backend="reference")

    assert torch.autograd.gradcheck(unit, (x, w, g, b, residual))


def test_momentum_none_is_a_cumulative_average():
    conv, bn, x, _ = _unit("3x3-s1-c13", torch.Generator().manual_seed(5))
    bn.momentum = None
    bn_copy = copy.deepcopy(bn).train()
    for i in range(3):
        xi = x + i
        _fused(conv, bn, xi, None, True, "reference", True)
        bn_copy(conv(xi))
    torch.testing.assert_close(bn.running_mean, bn_copy.running_mean)
    torch.testing.assert_close(bn.running_var, bn_copy.running_var)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        conv_bn_act(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, padding=1,
                    momentum=None, training=True)


def test_eval_empty_batch_returns_empty_like_stock():
    conv, bn, x, _ = _unit("3x3-s1-c13", torch.Generator().manual_seed(6))
    out = _fused(conv, bn.eval(), x[:0], None, True, None, False)
    assert out.shape == (0, 13, 7, 7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_of_a_fused_unit(backend):
    conv, bn, x, residual = _unit("3x3-s1-c13", torch.Generator().manual_seed(7))
    bn.eval()

    def unit(x, residual):
        return conv_bn_act(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, padding=1,
                           residual=residual, backend=backend)

    unit(x, residual)  # backend modules are imported on first use, outside the traced region
    compiled = torch.compile(unit, fullgraph=True, backend="aot_eager")
    expected = _stock(conv, bn, x, residual, True).detach()
    torch.testing.assert_close(compiled(x, residual), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- bad input


def _call(**overrides):
    conv, bn, x, residual = _unit("3x3-s1-c13", torch.Generator().manual_seed(8))
    args = dict(x=x, weight=conv.weight, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
                running_var=bn.running_var, padding=1, residual=residual)
    args.update(overrides)
    x = args.pop("x")
    weight = args.pop("weight")
    return conv_bn_act(x, weight, args.pop("bn_weight"), args.pop("bn_bias"), args.pop("running_mean"),
                       args.pop("running_var"), **args)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(x=torch.randn(13, 7, 7)), ValueError, "input must be 4-d"),
    (dict(x=torch.randn(3, 5, 7, 7)), ValueError, "input has 5 channels but the conv expects 13"),
    (dict(x=torch.randn(3, 13, 7, 7).double()), TypeError, "does not match conv weight dtype"),
    (dict(x=torch.randint(0, 3, (3, 13, 7, 7))), TypeError, "floating-point"),
    (dict(bn_weight=torch.ones(12)), ValueError, r"bn_weight must have shape \(13,\)"),
    (dict(running_var=torch.ones(13, 1)), ValueError, r"running_var must have shape \(13,\)"),
    (dict(residual=torch.randn(3, 13, 5, 5)), ValueError, "residual has shape"),
    (dict(residual=torch.randn(3, 13, 7, 7).double()), TypeError, "residual dtype"),
    (dict(x=torch.randn(3, 13, 7, 7, device="meta")), ValueError, "input is on meta"),
    (dict(running_mean=torch.zeros(13, device="meta")), ValueError, "running_mean is on meta"),
    (dict(x=torch.randn(3, 13, 1, 1), padding=0), ValueError, "too small"),
    (dict(stride="2"), ValueError, "stride must be an int"),
    (dict(training=True, x=torch.randn(0, 13, 7, 7), residual=None), ValueError, "non-empty batch"),
    (dict(training=True, x=torch.randn(1, 13, 1, 1), residual=None, padding=1), ValueError,
     "more than 1 value per channel"),
    (dict(backend="cudnn"), ValueError, "unknown backend"),
])
def test_bad_input_is_rejected_with_a_clear_message(overrides, error, message):
    with pytest.raises(error, match=message):
        _call(**overrides)


def test_explicit_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setattr(backends._extension, "load_error", lambda: "resnet_fast._C is not built (test)")
    with pytest.raises(resnet_fast.BackendUnavailableError, match=r"'extension' is not available on cpu: .*not built"):
        _call(backend="extension")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(resnet_fast.BackendUnavailableError, match="runs on CUDA devices"):
        _call(backend="triton")
    # auto falls back quietly
    assert backends.resolve("auto", "cpu") == "reference"


def test_selection_order_argument_context_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.requested_backend() == "reference"
    with resnet_fast.use_backend("auto"):
        assert backends.requested_backend() == "auto"
        assert backends.requested_backend("reference") == "reference"
        with resnet_fast.use_backend("triton"):
            assert backends.requested_backend() == "triton"
        assert backends.requested_backend() == "auto"
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="RESNET_FAST_BACKEND must be one of auto, reference, extension, triton; got 'fastest'"):
        backends.requested_backend()


@pytest.mark.parametrize("backend", ["reference", "extension", "triton"])
def test_one_value_per_channel_is_rejected_by_every_backend(backend):
    if not backends.is_available(backend, "cpu"):
        pytest.skip(f"{backend}: {backends.unavailable_reason(backend, 'cpu')}")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _call(training=True, x=torch.randn(1, 13, 1, 1), residual=None, padding=1, stride=2, backend=backend)
