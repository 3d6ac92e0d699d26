"""CPU inference on 8-channel blocks: the ``blocked_conv`` / ``winograd_conv3x3_blocked`` kernels
against float64, and FastResNet's blocked residual stages against its channels_last path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from resnet_fast import FastResNet, _extension
from tests.numerics import assert_tolerance, poison_allocator

if _extension.extension() is None:
    pytest.skip(f"extension not built: {_extension.load_error()}", allow_module_level=True)

from resnet_fast.ops import blocked  # noqa: E402

ops = torch.ops.resnet_fast

# (N, C_in, C_out, H, W, kernel, stride, padding): a half panel (C_out % 16 == 8), odd and
# non-square images, strided 1x1 and 3x3 (the downsample and stage-entry shapes), an unpadded 3x3,
# the 7x7 stem shape, a 1x1 image, and enough pixels for several chunks per image.
CONV_SHAPES = [(2, 16, 24, 9, 7, 1, 1, 0), (2, 16, 32, 9, 7, 1, 2, 0), (2, 16, 40, 9, 8, 3, 2, 1),
               (1, 8, 16, 5, 5, 3, 1, 1), (1, 8, 16, 6, 7, 3, 1, 0), (1, 8, 8, 11, 10, 7, 2, 3),
               (1, 16, 16, 1, 1, 3, 1, 1), (2, 64, 48, 20, 20, 1, 1, 0)]
CONV_IDS = ["1x1-half-panel", "1x1-s2", "3x3-s2", "3x3-s1", "3x3-unpadded", "7x7-s2", "1x1-image", "1x1-chunks"]


def _problem(n, c_in, c_out, h, w, kernel, stride, padding, seed=0):
    """float32 input, weight, bias, residual (exactly representable in float32) and float64 twins."""
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    x = torch.randn(n, c_in, h, w, generator=gen)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=gen) / (kernel * kernel * c_in) ** 0.5
    bias = torch.randn(c_out, generator=gen)
    residual = torch.randn(n, c_out, out_h, out_w, generator=gen)
    return (x, weight, bias, residual), tuple(t.double() for t in (x, weight, bias, residual))


def _expected(x, weight, bias, residual, relu, stride, padding):
    out = F.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=CONV_IDS)
@pytest.mark.parametrize("with_residual,relu", [(True, True), (False, True), (False, False)],
                         ids=["res-relu", "relu", "plain"])
def test_blocked_conv_matches_float64(shape, with_residual, relu):
    *_, stride, padding = shape
    (x, weight, bias, residual), (x64, weight64, bias64, residual64) = _problem(*shape)
    if not with_residual:
        residual = residual64 = None
    packed = ops.blocked_conv_weight(weight)
    poison_allocator(torch.empty(x.numel() * 4))
    out = ops.blocked_conv(blocked.to_blocked(x), packed, bias,
                           None if residual is None else blocked.to_blocked(residual), relu, stride, padding)
    assert out.dim() == 5 and out.shape[4] == 8, f"output must be (N, C/8, H, W, 8), got {tuple(out.shape)}"
    assert_tolerance(blocked.from_blocked(out), _expected(x64, weight64, bias64, residual64, relu, stride, padding),
                     _expected(x, weight, bias, residual, relu, stride, padding), f"blocked_conv {shape}")


@pytest.mark.parametrize("shape", [(2, 16, 24, 9, 7), (1, 8, 40, 14, 14), (2, 64, 64, 7, 7)],
                         ids=["half-panel", "channel-splits", "stage4-like"])
def test_winograd_blocked_is_the_channels_last_kernel_on_blocks(shape):
    """Same tiles, same products, same order: the blocked variant must give the same bits."""
    n, c_in, c_out, h, w = shape
    (x, weight, bias, residual), (x64, weight64, bias64, residual64) = _problem(n, c_in, c_out, h, w, 3, 1, 1)
    packed = ops.winograd_weight(weight)
    out = ops.winograd_conv3x3_blocked(blocked.to_blocked(x), packed, bias, blocked.to_blocked(residual), True)
    reference = ops.winograd_conv3x3(x, packed, bias, residual, True)
    assert torch.equal(blocked.from_blocked(out), reference), "blocked Winograd differs from the channels_last one"
    assert_tolerance(blocked.from_blocked(out), _expected(x64, weight64, bias64, residual64, True, 1, 1),
                     _expected(x, weight, bias, residual, True, 1, 1), f"winograd_conv3x3_blocked {shape}")


@pytest.mark.parametrize("shape", [CONV_SHAPES[0], CONV_SHAPES[2]], ids=["1x1", "3x3-s2"])
def test_blocked_conv_add_writes_the_same_result_over_the_residual(shape):
    *_, stride, padding = shape
    (x, weight, bias, residual), _ = _problem(*shape)
    xb, rb, packed = blocked.to_blocked(x), blocked.to_blocked(residual), ops.blocked_conv_weight(weight)
    expected = ops.blocked_conv(xb, packed, bias, rb, True, stride, padding)
    out = rb.clone()
    ops.blocked_conv_add_(xb, packed, bias, out, True, stride, padding)
    assert torch.equal(out, expected), "in-place residual add differs from blocked_conv"
    with pytest.raises(RuntimeError, match=r"out shape .* does not match the output shape"):
        ops.blocked_conv_add_(xb, packed, bias, out[:, :, 1:], True, stride, padding)
    strided = out.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    with pytest.raises(RuntimeError, match=r"out must be contiguous"):
        ops.blocked_conv_add_(xb, packed, bias, strided, True, stride, padding)


def test_blocked_conv_results_do_not_depend_on_thread_count():
    (x, weight, bias, residual), _ = _problem(2, 32, 48, 17, 15, 3, 2, 1, seed=1)
    packed, xb, rb = ops.blocked_conv_weight(weight), blocked.to_blocked(x), blocked.to_blocked(residual)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outputs.append(ops.blocked_conv(xb, packed, bias, rb, True, 2, 1))
    finally:
        torch.set_num_threads(threads)
    for count, out in zip((2, 3), outputs[1:]):
        assert torch.equal(out, outputs[0]), f"{count} threads gave different bits than 1 thread"


def test_blocked_relu_propagates_nan_like_torch():
    (x, weight, bias, _), _ = _problem(1, 8, 16, 6, 6, 1, 1, 0)
    x[0, 3, 2, 2] = float("nan")
    out = ops.blocked_conv(blocked.to_blocked(x), ops.blocked_conv_weight(weight), bias, None, True, 1, 0)
    expected = torch.relu(F.conv2d(x, weight, bias))
    assert torch.equal(torch.isnan(blocked.from_blocked(out)), torch.isnan(expected)), \
        "NaN positions differ from torch.relu(conv2d)"


def test_blocked_opcheck():
    (x, weight, bias, residual), _ = _problem(2, 8, 16, 6, 5, 3, 2, 1)
    xb, rb = blocked.to_blocked(x), blocked.to_blocked(residual)
    torch.library.opcheck(ops.blocked_conv_weight, (weight,))
    torch.library.opcheck(ops.max_pool_to_blocked, (x.contiguous(memory_format=torch.channels_last), 3, 2, 1))
    torch.library.opcheck(ops.blocked_conv, (xb, ops.blocked_conv_weight(weight), bias, rb, True, 2, 1))
    torch.library.opcheck(ops.blocked_conv_add_, (xb, ops.blocked_conv_weight(weight), bias, rb.clone(), True, 2, 1))
    (x, weight, bias, residual), _ = _problem(2, 8, 16, 6, 5, 3, 1, 1)
    torch.library.opcheck(ops.winograd_conv3x3_blocked, (blocked.to_blocked(x), ops.winograd_weight(weight), bias,
                                                         blocked.to_blocked(residual), False))


def test_blocked_bad_inputs_raise_clear_errors():
    (x, weight, bias, residual), _ = _problem(1, 16, 16, 6, 6, 3, 1, 1)
    xb, rb, packed = blocked.to_blocked(x), blocked.to_blocked(residual), ops.blocked_conv_weight(weight)
    with pytest.raises(RuntimeError, match=r"x must be in 8-channel blocks, shape \(N, C/8, H, W, 8\)"):
        ops.blocked_conv(x, packed, bias, None, True, 1, 1)
    with pytest.raises(RuntimeError, match=r"x must be a float32 CPU tensor, got Double"):
        ops.blocked_conv(xb.double(), packed, bias, None, True, 1, 1)
    with pytest.raises(RuntimeError, match=r"packed_weight must come from blocked_conv_weight for 8 input channels"):
        ops.blocked_conv(xb[:, :1], packed, bias, None, True, 1, 1)
    with pytest.raises(RuntimeError, match=r"bias must have one value per output channel"):
        ops.blocked_conv(xb, packed, torch.randn(12), None, True, 1, 1)
    with pytest.raises(RuntimeError, match=r"residual shape .* does not match the output shape"):
        ops.blocked_conv(xb, packed, bias, rb[:, :, :3], True, 1, 1)
    with pytest.raises(RuntimeError, match=r"stride must be >= 1"):
        ops.blocked_conv(xb, packed, bias, None, True, 0, 1)
    with pytest.raises(RuntimeError, match=r"kernels up to 7x7"):
        ops.blocked_conv(xb, ops.blocked_conv_weight(torch.randn(16, 16, 9, 9)), bias, None, True, 1, 4)
    with pytest.raises(RuntimeError, match=r"does not fit the padded 6x6 input"):
        ops.blocked_conv(xb, ops.blocked_conv_weight(torch.randn(16, 16, 7, 7)), bias, None, True, 1, 0)
    with pytest.raises(RuntimeError, match=r"winograd_conv3x3_blocked: x must be in 8-channel blocks"):
        ops.winograd_conv3x3_blocked(x, ops.winograd_weight(weight), bias, None, True)
    with pytest.raises(ValueError, match=r"C a multiple of 8"):
        blocked.to_blocked(torch.randn(1, 12, 4, 4))
    with pytest.raises(ValueError, match=r"from_blocked expects"):
        blocked.from_blocked(x)


@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 2, 1, (9, 8)), (2, 2, 0, (6, 7)), (3, 1, 1, (4, 5)),
                                                        (1, 1, 0, (3, 3))])
def test_max_pool_to_blocked_matches_torch(kernel, stride, padding, size):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, *size, generator=gen).contiguous(memory_format=torch.channels_last)
    x[1, 9, 2, 1] = float("nan")
    x[0, 3] = -float("inf")
    out = ops.max_pool_to_blocked(x, kernel, stride, padding)
    expected = F.max_pool2d(x, kernel, stride, padding)
    assert torch.equal(blocked.from_blocked(out).isnan(), expected.isnan()), "NaN positions differ from max_pool2d"
    assert torch.equal(blocked.from_blocked(out).nan_to_num(), expected.nan_to_num()), "values differ from max_pool2d"
    pool = torch.nn.MaxPool2d(kernel, stride, padding)
    assert torch.equal(blocked.max_pool_to_blocked(x, pool).nan_to_num(), blocked.to_blocked(expected).nan_to_num())
    with pytest.raises(RuntimeError, match=r"C a positive multiple of 8"):
        ops.max_pool_to_blocked(x[:, :12], kernel, stride, padding)
    with pytest.raises(RuntimeError, match=r"padding <= kernel / 2"):
        ops.max_pool_to_blocked(x, kernel, stride, kernel)


def test_blocked_layout_round_trip():
    x = torch.randn(2, 24, 5, 3).contiguous(memory_format=torch.channels_last)
    xb = blocked.to_blocked(x)
    assert xb.shape == (2, 3, 5, 3, 8) and xb.is_contiguous()
    assert torch.equal(xb[1, 2, 4, 1], x[1, 16:24, 4, 1]), "block 2 of a pixel must hold channels 16..23"
    back = blocked.from_blocked(xb)
    assert torch.equal(back, x) and back.is_contiguous(memory_format=torch.channels_last)


def test_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_BLOCKED", "yes")
    _, fast = _models("resnet18")
    with torch.no_grad(), pytest.raises(ValueError, match="RESNET_FAST_CPU_BLOCKED must be one of auto, 1, 0; got 'yes'"):
        fast(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------
# FastResNet's residual stages on blocks

def _models(arch: str, **kwargs):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(**kwargs).eval()
    for m in tv.modules():  # non-trivial BN statistics, so the fold matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return tv, FastResNet.from_torchvision(tv).eval()


def _count_blocked_units(monkeypatch) -> list:
    """Patches the blocked kernels to count their calls (the plan looks them up when it runs them)."""
    calls = []
    for name in ("direct_unit", "winograd_unit"):
        original = getattr(blocked, name)

        def counting(*args, original=original, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(blocked, name, counting)
    return calls


@pytest.mark.parametrize("arch,units", [("resnet18", 19), ("resnet50", 52)])
def test_fastresnet_blocked_stages_match_float64_and_channels_last(arch, units, monkeypatch):
    tv, fast = _models(arch)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref64 = tv.double()(x.double())
        tv.float()
        stock = tv(x)
        monkeypatch.setenv("RESNET_FAST_CPU_BLOCKED", "0")
        channels_last = fast(x)
        monkeypatch.setenv("RESNET_FAST_CPU_BLOCKED", "1")
        fast.explain(x)  # plans (and times kernels) before the count starts
        calls = _count_blocked_units(monkeypatch)
        out = fast(x)
        features = fast.forward_features(x)
    assert len(calls) == 2 * units, f"expected {units} blocked units per pass, ran {len(calls) / 2}"
    assert_tolerance(out, ref64, stock, f"{arch} blocked")
    assert_tolerance(out, ref64, channels_last, f"{arch} blocked vs channels_last path", factor=2.0)
    assert features.shape == (2, fast.fc.in_features, 2, 2)
    assert features.is_contiguous(memory_format=torch.channels_last)


def _hooked(fast):
    seen = []
    fast.layer2.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    return seen


@pytest.mark.parametrize("case", ["env-off", "hook", "grad", "train", "float64", "groups", "other-pool"])
def test_fastresnet_falls_back_to_channels_last(case, monkeypatch):
    """Wherever the blocked stages could not give what calling the stages gives, they are skipped."""
    tv, fast = _models("resnext50_32x4d" if case == "groups" else "resnet18")
    monkeypatch.setenv("RESNET_FAST_CPU_BLOCKED", "0" if case == "env-off" else "1")
    x = torch.randn(2, 3, 32, 32)
    seen = _hooked(fast) if case == "hook" else None
    if case == "train":
        fast.train()
    if case == "float64":
        fast.double()
        x = x.double()
    if case == "other-pool":
        fast.maxpool = torch.nn.AvgPool2d(3, 2, 1)
    calls = _count_blocked_units(monkeypatch)
    if case == "grad":
        out = fast(x)
        out.sum().backward()
        assert fast.conv1.weight.grad is not None and fast.layer1[0].conv1.weight.grad is not None
    else:
        with torch.no_grad():
            out = fast(x)
    assert not calls, f"{case}: the blocked stages ran {len(calls)} units"
    if case == "hook":
        assert seen == [torch.Size([2, 128, 4, 4])], f"the layer2 hook saw {seen}"
