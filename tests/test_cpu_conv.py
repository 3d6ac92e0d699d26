"""The CPU training unit's convolution: im2col GEMM against the float64 reference, and the per-shape choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_fast.ops import cpu_conv
from resnet_fast.ops.folding import ConvGeometry
from tests.numerics import assert_tolerance

# (in, out, kernel, stride, padding, dilation, image size, bias)
CASES = {
    "3x3-s1": (16, 24, 3, 1, 1, 1, 6, False),
    "3x3-s2-odd": (13, 8, 3, 2, 1, 1, 7, False),
    "1x1-s2": (16, 32, 1, 2, 0, 1, 8, False),
    "7x7-s2-stem": (3, 16, 7, 2, 3, 1, 13, False),
    "3x3-dilated-bias": (8, 8, 3, 1, 2, 2, 9, True),
}


def _case(name: str, memory_format: torch.memory_format):
    cin, cout, k, stride, padding, dilation, size, with_bias = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(3, cin, size, size + 1, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64) / k
    bias = torch.randn(cout, generator=g, dtype=torch.float64) if with_bias else None
    geometry = ConvGeometry((stride, stride), (padding, padding), (dilation, dilation), 1)
    return x.contiguous(memory_format=memory_format), weight, bias, geometry


def _forward_backward(conv, x, weight, bias, geometry, grad_seed=0):
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_())
    out = conv(leaves[0], leaves[1], leaves[2] if bias is not None else None, geometry)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("name", list(CASES))
def test_gemm_conv2d_matches_float64_reference(name, layout):
    memory_format = torch.channels_last if layout == "cl" else torch.contiguous_format
    x64, w64, b64, geometry = _case(name, memory_format)
    ref_out, ref_grads = _forward_backward(cpu_conv.onednn_conv2d, x64, w64, b64, geometry)
    as32 = [t if t is None else t.float() for t in (x64, w64, b64)]
    out, grads = _forward_backward(cpu_conv.gemm_conv2d, *as32, geometry)
    stock_out, stock_grads = _forward_backward(cpu_conv.onednn_conv2d, *as32, geometry)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert_tolerance(out, ref_out, stock_out, f"gemm conv {name} output")
    for label, got, ref, stock in zip(("grad_x", "grad_weight", "grad_bias"), grads, ref_grads, stock_grads):
        assert_tolerance(got, ref, stock, f"gemm conv {name} {label}")


def test_gemm_conv2d_rejects_groups():
    x, weight, _, _ = _case("3x3-s1", torch.contiguous_format)
    with pytest.raises(ValueError, match="groups=1 only, got groups=2"):
        cpu_conv.gemm_conv2d(x, weight[:, :8], None, ConvGeometry((1, 1), (1, 1), (1, 1), 2))


def test_ineligible_convolutions_stay_on_onednn(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_CONV", "gemm")
    x, weight, _, geometry = _case("3x3-s1", torch.contiguous_format)
    assert cpu_conv.choose_algorithm(x, weight, None, geometry) == "onednn"  # float64
    grouped = ConvGeometry((1, 1), (1, 1), (1, 1), 2)
    assert cpu_conv.choose_algorithm(x.float(), weight[:, :8].float(), None, grouped) == "onednn"
    assert cpu_conv.choose_algorithm(x.float(), weight.float(), None, geometry) == "gemm"


def test_forced_algorithm_and_bad_value(monkeypatch):
    x, weight, _, geometry = _case("3x3-s1", torch.contiguous_format)
    x, weight = x.float(), weight.float()
    monkeypatch.setenv("RESNET_FAST_CPU_CONV", "onednn")
    assert cpu_conv.choose_algorithm(x, weight, None, geometry) == "onednn"
    monkeypatch.setenv("RESNET_FAST_CPU_CONV", "winograd")
    with pytest.raises(ValueError, match="RESNET_FAST_CPU_CONV must be one of auto, onednn, gemm; got 'winograd'"):
        cpu_conv.choose_algorithm(x, weight, None, geometry)


def test_auto_measures_once_per_shape_and_keeps_the_faster(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_CONV", "auto")
    monkeypatch.setattr(cpu_conv, "_choices", {})
    measured = []

    def fake_timing(conv, x, weight, bias, geometry, grad_out):
        measured.append(conv)
        assert grad_out.shape == F.conv2d(x, weight, bias, geometry.stride, geometry.padding).shape
        return 1.0 if conv is cpu_conv.onednn_conv2d else 0.5

    monkeypatch.setattr(cpu_conv, "_seconds_per_step", fake_timing)
    x, weight, _, geometry = _case("3x3-s1", torch.contiguous_format)
    x, weight = x.float(), weight.float()
    assert cpu_conv.choose_algorithm(x, weight, None, geometry) == "gemm"
    assert cpu_conv.choose_algorithm(x, weight, None, geometry) == "gemm"
    assert measured == [cpu_conv.onednn_conv2d, cpu_conv.gemm_conv2d], "one measurement per algorithm, then cached"
    other = x[:2].contiguous()  # a new shape is measured again
    cpu_conv.choose_algorithm(other, weight, None, geometry)
    assert len(measured) == 4


def test_real_measurement_returns_a_known_algorithm(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_CONV", "auto")
    monkeypatch.setattr(cpu_conv, "_choices", {})
    x, weight, _, geometry = _case("3x3-s1", torch.contiguous_format)
    x, weight = x.float().requires_grad_(), weight.float().requires_grad_()
    rng_before = torch.get_rng_state()
    assert cpu_conv.choose_algorithm(x, weight, None, geometry) in cpu_conv.ALGORITHMS
    assert x.grad is None and weight.grad is None, "measuring must not touch the caller's tensors"
    assert torch.equal(torch.get_rng_state(), rng_before), "measuring must not advance the global RNG"


@pytest.mark.parametrize("algorithm", cpu_conv.ALGORITHMS)
def test_extension_training_unit_with_each_algorithm(algorithm, monkeypatch):
    """The whole unit (conv, batch-stat BN, residual, ReLU) with either conv, against float64."""
    from resnet_fast import _extension
    from resnet_fast import ops

    if _extension.extension() is None:
        pytest.skip(f"resnet_fast._C is not available: {_extension.load_error()}")
    monkeypatch.setenv("RESNET_FAST_CPU_CONV", algorithm)
    x64, w64, _, geometry = _case("3x3-s2-odd", torch.contiguous_format)
    g = torch.Generator().manual_seed(3)
    residual64 = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)
    gamma64 = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    beta64 = torch.randn(8, generator=g, dtype=torch.float64)
    grad64 = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)

    def run(dtype, backend):
        leaves = [t.to(dtype).requires_grad_() for t in (x64, w64, gamma64, beta64, residual64)]
        out = ops.conv_bn_act_train(leaves[0], leaves[1], None, geometry, leaves[2], leaves[3], None, None, 0.1,
                                    1e-5, leaves[4], True, backend=backend)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad64.to(dtype)))

    refs, stocks = run(torch.float64, "reference"), run(torch.float32, "reference")
    got = run(torch.float32, "extension")
    for label, out, ref, stock in zip(("out", "grad_x", "grad_weight", "grad_gamma", "grad_beta", "grad_residual"),
                                      got, refs, stocks):
        assert_tolerance(out, ref, stock, f"{algorithm} unit {label}")
