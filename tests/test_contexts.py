"""FastResNet in every context a user runs a model in, against torchvision with the same weights.

The matrix: inference context (``torch.inference_mode()``, ``torch.no_grad()``, grad-enabled eval
with input gradients, ``torch.autocast("cpu", bfloat16)``) x backend x memory format x the CPU
paths that the machine's ISA selects and the ones it does not (forced with the package's
settings). Then the order of contexts (caches built in one serve the others), NaN and Inf
propagation, and weights edited in every way a user can edit them.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast import backends
from tests.fixtures import assert_buffers_match, randomize_bn
from tests.numerics import assert_tolerance

CPU_BACKENDS = [name for name in ("reference", "extension") if backends.is_available(name, "cpu")]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# The extension's CPU inference paths, forced both ways whatever the ISA would choose.
CPU_PATHS = {
    "auto": {},
    "winograd-blocked": {"RESNET_FAST_CPU_CONV3X3": "winograd", "RESNET_FAST_CPU_BLOCKED": "1"},
    "winograd-channels_last": {"RESNET_FAST_CPU_CONV3X3": "winograd", "RESNET_FAST_CPU_BLOCKED": "0"},
    "onednn": {"RESNET_FAST_CPU_CONV3X3": "onednn", "RESNET_FAST_CPU_BLOCKED": "0"},
    "onednn-blocked": {"RESNET_FAST_CPU_CONV3X3": "onednn", "RESNET_FAST_CPU_BLOCKED": "1"},
}
CONTEXTS = ("inference_mode", "no_grad", "grad", "autocast_bf16")


def image_batch(batch: int = 2, size: int = 32, layout: str = "nchw") -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    return x.contiguous(memory_format=LAYOUTS[layout])


@pytest.fixture(scope="module")
def resnet18_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    return tv, copy.deepcopy(tv).double()


def run_in_context(model: nn.Module, x: torch.Tensor, context: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's output in ``context``, and for ``grad`` the input gradient of ``out.square().sum()``."""
    if context == "inference_mode":
        with torch.inference_mode():
            return model(x), None
    if context == "no_grad":
        with torch.no_grad():
            return model(x), None
    if context == "autocast_bf16":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x), None
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), grad


def check_against_torchvision(fast: nn.Module, tv: nn.Module, tv64: nn.Module, x: torch.Tensor, context: str,
                              what: str) -> None:
    out, grad = run_in_context(fast, x, context)
    stock, stock_grad = run_in_context(tv, x, context)
    ref64, ref64_grad = run_in_context(tv64, x.double(), "grad" if context == "grad" else "no_grad")
    assert out.dtype == stock.dtype, f"{what}: output dtype {out.dtype}, torchvision gives {stock.dtype}"
    assert_tolerance(out.float(), ref64, stock.float(), f"{what} logits")
    if context == "grad":
        assert_tolerance(grad, ref64_grad, stock_grad, f"{what} input gradient")


def backend_cases(forced_paths: list[str]) -> list:
    """(backend, path) pairs: every backend on its default path, the extension also on each forced one."""
    cases = [pytest.param(backend, "auto", id=f"{backend}-auto") for backend in CPU_BACKENDS]
    if "extension" in CPU_BACKENDS:
        cases += [pytest.param("extension", path, id=f"extension-{path}") for path in forced_paths]
    return cases


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend, cpu_path", backend_cases([p for p in CPU_PATHS if p != "auto"]))
@pytest.mark.parametrize("context", CONTEXTS)
def test_eval_matches_torchvision_in_every_context(context, backend, cpu_path, layout, resnet18_pair, monkeypatch):
    for name, value in CPU_PATHS[cpu_path].items():
        monkeypatch.setenv(name, value)
    tv, tv64 = resnet18_pair
    fast = resnet_fast.FastResNet.from_torchvision(tv).eval().set_backend(backend)
    check_against_torchvision(fast, tv, tv64, image_batch(layout=layout), context,
                              f"{context}/{backend}/{layout}/{cpu_path}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_contexts_in_every_order_share_one_model(backend, resnet18_pair):
    """Caches built under one context (inference tensors under inference_mode, say) serve every later one."""
    tv, tv64 = resnet18_pair
    x = image_batch()
    contexts = ("inference_mode", "no_grad", "grad")
    expected = {context: (run_in_context(tv, x, context),
                          run_in_context(tv64, x.double(), "grad" if context == "grad" else "no_grad"))
                for context in contexts}
    # Each rotation, run twice over, holds every ordered pair of contexts: all transitions are covered.
    for order in (contexts[i:] + contexts[:i] for i in range(len(contexts))):
        fast = resnet_fast.FastResNet.from_torchvision(tv).eval().set_backend(backend)
        for context in order + order:
            what = f"{backend}: {' -> '.join(order)}, now {context}"
            (stock, stock_grad), (ref64, ref64_grad) = expected[context]
            out, grad = run_in_context(fast, x, context)
            assert_tolerance(out, ref64, stock, f"{what} logits")
            if context == "grad":
                assert_tolerance(grad, ref64_grad, stock_grad, f"{what} input gradient")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend, cpu_conv", backend_cases(["onednn", "gemm"]))
@pytest.mark.parametrize("context", ("inference_mode", "no_grad", "grad"))
def test_train_mode_matches_torchvision_in_every_context(context, backend, cpu_conv, layout, resnet18_pair,
                                                         monkeypatch):
    """Train-mode forward (batch statistics, running-stat update) under each context, as torchvision;
    the extension's training convolution forced to each of its algorithms too."""
    if cpu_conv != "auto":
        monkeypatch.setenv("RESNET_FAST_CPU_CONV", cpu_conv)
    tv, _ = resnet18_pair
    tv = copy.deepcopy(tv).train()
    tv64 = copy.deepcopy(tv).double()
    fast = resnet_fast.FastResNet.from_torchvision(tv).set_backend(backend)
    # 48x48: layer4's batch statistics then average 12 values, not 3 (an ill-conditioned BatchNorm)
    x = image_batch(batch=3, size=48, layout=layout)
    what = f"train/{context}/{backend}/{layout}/{cpu_conv}"
    out, grad = run_in_context(fast, x, context)
    stock, stock_grad = run_in_context(tv, x, context)
    ref64, ref64_grad = run_in_context(tv64, x.double(), "grad" if context == "grad" else "no_grad")
    assert_tolerance(out, ref64, stock, f"{what} logits")
    if context == "grad":
        assert_tolerance(grad, ref64_grad, stock_grad, f"{what} input gradient")
    assert_buffers_match(fast, tv, tv64, what)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_unit_under_inference_mode(backend):
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64).float()
    weight = torch.randn(16, 8, 3, 3)
    gamma, beta = torch.rand(16) + 0.5, torch.randn(16)
    mean, var = torch.randn(16) * 0.1, torch.rand(16) + 0.5
    expected = torch.relu(nn.functional.batch_norm(nn.functional.conv2d(x.double(), weight.double(), padding=1),
                                                   mean.double(), var.double(), gamma.double(), beta.double()))
    stock = torch.relu(nn.functional.batch_norm(nn.functional.conv2d(x, weight, padding=1), mean, var, gamma, beta))
    for _ in range(2):
        with torch.inference_mode():
            out = resnet_fast.conv_bn_act(x, weight, gamma, beta, mean, var, padding=1, backend=backend)
        assert_tolerance(out, expected, stock, "conv_bn_act under inference_mode")


def test_threads_share_one_model(resnet18_pair):
    """Four threads serve one model at once, under inference_mode and no_grad, each with its own input."""
    tv, tv64 = resnet18_pair
    fast = resnet_fast.FastResNet.from_torchvision(tv).eval()
    inputs = [image_batch(batch=1, size=40 + 8 * i) for i in range(4)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def serve(i: int) -> None:
        try:
            for _ in range(3):
                with torch.inference_mode() if i % 2 else torch.no_grad():
                    results[i] = fast(inputs[i])
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"a serving thread failed: {errors[0]!r}"
    with torch.no_grad():
        for i, x in enumerate(inputs):
            assert_tolerance(results[i], tv64(x.double()), tv(x), f"thread {i} logits")


# ----------------------------------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend, cpu_path", backend_cases([p for p in CPU_PATHS if p != "auto"]))
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_propagate_like_torchvision(poison, backend, cpu_path, layout, resnet18_pair, monkeypatch):
    for name, value in CPU_PATHS[cpu_path].items():
        monkeypatch.setenv(name, value)
    tv, _ = resnet18_pair
    fast = resnet_fast.FastResNet.from_torchvision(tv).eval().set_backend(backend)
    x = image_batch(batch=2, layout=layout)
    x[0, 1, 20, 17] = poison
    with torch.inference_mode():
        out, stock = fast(x), tv(x)
    assert torch.equal(out.isnan(), stock.isnan()), (
        f"NaN pattern differs from torchvision: {int(out.isnan().sum())} NaN logits, torchvision "
        f"{int(stock.isnan().sum())}")
    assert torch.equal(out.isinf(), stock.isinf()), "Inf pattern differs from torchvision"
    assert stock.isnan().any(), "the test expects torchvision's logits to hold NaN"


def test_nan_in_a_weight_propagates_like_torchvision(resnet18_pair):
    tv, _ = resnet18_pair
    tv = copy.deepcopy(tv)
    with torch.no_grad():
        tv.layer3[1].conv1.weight[5, 2, 1, 1] = float("nan")
    fast = resnet_fast.FastResNet.from_torchvision(tv).eval()
    x = image_batch()
    with torch.inference_mode():
        out, stock = fast(x), tv(x)
    assert stock.isnan().all(), "the test expects torchvision to give NaN everywhere"
    assert torch.equal(out.isnan(), stock.isnan()), f"{int(out.isnan().sum())} NaN logits of {out.numel()}"


# ----------------------------------------------------------------------------------------- edited weights


def _edits() -> dict:
    def data_mul(model):
        model.layer2[0].conv1.weight.data.mul_(0.5)

    def data_bn(model):
        model.layer3[0].bn2.running_var.data.mul_(4.0)

    def copy_no_grad(model):
        with torch.no_grad():
            model.layer1[1].conv2.weight.copy_(model.layer1[1].conv2.weight.flip(0))

    def permute_channels(model):
        # A surgery script's permutation of filters through .data: a plain sum of the weights cannot see it.
        weight = model.layer4[0].conv1.weight.data
        weight.copy_(weight.roll(1, dims=0))

    def load_state(model):
        state = {k: (v * 1.5 if k.endswith("conv2.weight") else v) for k, v in model.state_dict().items()}
        model.load_state_dict(state)

    def swap_module(model):
        conv = model.layer2[1].conv1
        new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
        with torch.no_grad():
            new.weight.copy_(conv.weight * -1.0)
        model.layer2[1].conv1 = new

    def replace_parameter(model):
        conv = model.layer1[0].conv1
        conv.weight = nn.Parameter(conv.weight.detach() * 0.25)

    def assign_data(model):
        model.layer3[1].conv2.weight.data = model.layer3[1].conv2.weight.data * 2.0

    return dict(data_mul=data_mul, data_bn=data_bn, copy_no_grad=copy_no_grad, permute_channels=permute_channels,
                load_state_dict=load_state, swap_module=swap_module, replace_parameter=replace_parameter,
                assign_data=assign_data)


EDITS = _edits()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("context", ("inference_mode", "no_grad"))
@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_weights_are_never_served_stale(edit, context, backend, resnet18_pair):
    tv, _ = resnet18_pair
    tv = copy.deepcopy(tv)
    fast = resnet_fast.FastResNet.from_torchvision(tv).eval().set_backend(backend)
    x = image_batch()
    run_in_context(fast, x, context)  # builds the fold caches
    EDITS[edit](tv)
    EDITS[edit](fast)
    out, _ = run_in_context(fast, x, context)
    stock, _ = run_in_context(tv, x, context)
    ref64, _ = run_in_context(copy.deepcopy(tv).double(), x.double(), "no_grad")
    assert_tolerance(out, ref64, stock, f"logits after {edit}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_call_and_dtype_moves_are_seen(backend, resnet18_pair):
    tv, tv64 = resnet18_pair
    fast = resnet_fast.FastResNet.from_torchvision(tv).eval().set_backend(backend)
    x = image_batch()
    with torch.inference_mode():
        fast(x)
        scaled = {k: v * 0.5 if k.endswith("conv1.weight") else v for k, v in fast.state_dict().items()}
        out = torch.func.functional_call(fast, scaled, (x,))
        tv_scaled = copy.deepcopy(tv)
        tv_scaled.load_state_dict(scaled)
        assert_tolerance(out, copy.deepcopy(tv_scaled).double()(x.double()), tv_scaled(x), "functional_call")
        assert_tolerance(fast(x), tv64(x.double()), tv(x), "after functional_call, own weights again")
        out64 = fast.double()(x.double())
        assert out64.dtype == torch.float64
        assert_tolerance(out64, tv64(x.double()), tv64(x.double()), "after model.double()", floor=1e-10)
        assert_tolerance(fast.float()(x), tv64(x.double()), tv(x), "after model.float()")


def test_model_built_under_inference_mode(resnet18_pair):
    """Parameters that are inference tensors have no version counter: edits are still seen."""
    tv, tv64 = resnet18_pair
    with torch.inference_mode():
        fast = resnet_fast.resnet18(num_classes=10).eval()
        fast.load_state_dict(tv.state_dict())
        x = image_batch()
        assert_tolerance(fast(x), tv64(x.double()), tv(x), "inference-tensor model")
        fast.layer2[0].conv1.weight.mul_(0.5)
        edited = copy.deepcopy(tv)
        with torch.no_grad():
            edited.layer2[0].conv1.weight.mul_(0.5)
        assert_tolerance(fast(x), copy.deepcopy(edited).double()(x.double()), edited(x), "after an in-place edit")


@pytest.mark.parametrize("edit", ["data_mul", "permute_channels"])
def test_version_check_setting_trusts_version_counters(edit, resnet18_pair, monkeypatch):
    """RESNET_FAST_WEIGHT_CHECK=version skips the content fingerprint: a .data edit then needs refresh()."""
    monkeypatch.setenv("RESNET_FAST_WEIGHT_CHECK", "version")
    tv, _ = resnet18_pair
    tv = copy.deepcopy(tv)
    fast = resnet_fast.FastResNet.from_torchvision(tv).eval()
    x = image_batch()
    with torch.inference_mode():
        before = fast(x)
        EDITS[edit](tv)
        EDITS[edit](fast)
        assert torch.equal(fast(x), before), "the version setting should serve the cached fold"
        stock = tv(x)
        assert_tolerance(fast.refresh()(x), copy.deepcopy(tv).double()(x.double()), stock, "after refresh()")
    monkeypatch.setenv("RESNET_FAST_WEIGHT_CHECK", "sometimes")
    with pytest.raises(ValueError, match="RESNET_FAST_WEIGHT_CHECK"):
        with torch.inference_mode():
            fast(x)


# ----------------------------------------------------------------------------------------- CUDA (gpu_check.sh)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "extension", "triton"])
@pytest.mark.parametrize("context", ["inference_mode", "no_grad", "grad", "autocast_fp16", "autocast_bf16"])
def test_cuda_eval_matches_torchvision_in_every_context(context, backend, resnet18_pair):
    if not backends.is_available(backend, "cuda"):
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    tv, tv64 = resnet18_pair
    tv = copy.deepcopy(tv).cuda()
    fast = resnet_fast.FastResNet.from_torchvision(tv).eval().set_backend(backend)
    x = image_batch(layout="channels_last").cuda()

    def run(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        if context.startswith("autocast"):
            dtype = torch.float16 if context == "autocast_fp16" else torch.bfloat16
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                return model(x), None
        return run_in_context(model, x, context)

    (out, grad), (stock, stock_grad) = run(fast), run(tv)
    ref64, ref64_grad = run_in_context(tv64, x.double().cpu(), "grad" if context == "grad" else "no_grad")
    assert out.dtype == stock.dtype, f"output dtype {out.dtype}, torchvision gives {stock.dtype}"
    assert_tolerance(out.float().cpu(), ref64, stock.float().cpu(), f"cuda {context}/{backend} logits")
    if grad is not None:
        assert_tolerance(grad.cpu(), ref64_grad, stock_grad.cpu(), f"cuda {context}/{backend} input gradient")
