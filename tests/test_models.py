"""FastResNet against torchvision with the same weights: eval, train, gradients, running stats, checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast import backends
from resnet_fast.models.resnet import ARCHITECTURES
from tests.fixtures import randomize_bn
from tests.numerics import assert_tolerance

CPU_BACKENDS = [name for name in ("reference", "extension") if backends.is_available(name, "cpu")]
ARCHS = ["resnet18", "resnet50", "resnext50_32x4d"]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _pair(arch: str, num_classes: int = 10) -> tuple[nn.Module, resnet_fast.FastResNet]:
    tv = getattr(torchvision.models, arch)(num_classes=num_classes)
    randomize_bn(tv, seed=1)
    return tv, resnet_fast.FastResNet.from_torchvision(tv)


def _input(batch=2, size=64, layout="nchw", dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    return x.to(dtype).contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_same_keys_shapes_and_init_as_torchvision(arch):
    torch.manual_seed(123)
    tv = getattr(torchvision.models, arch)(zero_init_residual=True)
    torch.manual_seed(123)
    fast = ARCHITECTURES[arch](zero_init_residual=True)
    tv_state, fast_state = tv.state_dict(), fast.state_dict()
    assert list(tv_state) == list(fast_state), "state_dict keys differ from torchvision's"
    for key, value in tv_state.items():
        assert torch.equal(value, fast_state[key]), f"{arch}: initial value of {key} differs from torchvision's"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_eval_matches_torchvision_fp32(arch, layout, backend):
    tv, fast = _pair(arch)
    tv.eval(), fast.eval().set_backend(backend)
    x = _input(layout=layout)
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()(x.double())
        stock = tv(x)
        out = fast(x)
    assert_tolerance(out, ref64, stock, f"{arch} eval logits")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eval_compiles_as_one_graph(backend):
    """torch.compile(fullgraph=True) of the whole model in inference gives the eager result; with the
    extension backend the graph holds the Winograd 3x3 convolution (the eager CPU path)."""
    _, fast = _pair("resnet18")
    fast.eval().set_backend(backend)
    x = _input(size=32, layout="channels_last")
    graph_ops: set = set()

    def record_ops(gm: torch.fx.GraphModule, example_inputs):
        graph_ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    with torch.no_grad():
        expected = fast(x)
        torch._dynamo.reset()
        out = torch.compile(fast, fullgraph=True, backend=record_ops)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # torch < 2.14 reports torch.compiler.is_exporting() inside every dynamo trace, so the units resolve
    # to the exportable reference path there (backends.resolve); the graph is then stock ops.
    exports_while_compiling = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 14)
    if backend == "extension" and resnet_fast.settings.value("cpu_conv3x3") != "onednn" \
            and not exports_while_compiling:
        assert "resnet_fast.winograd_conv3x3" in graph_ops, " ".join(sorted(graph_ops))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eval_matches_torchvision_bf16(backend):
    tv, fast = _pair("resnet18")
    tv.eval(), fast.eval().set_backend(backend)
    x = _input(layout="channels_last")
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()(x.double())
        stock = copy.deepcopy(tv).bfloat16()(x.bfloat16())
        out = fast.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_tolerance(out, ref64, stock, "resnet18 bf16 eval logits")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_train_forward_matches_torchvision_fp32(arch, layout, backend):
    tv, fast = _pair(arch)
    ref64 = copy.deepcopy(tv).double()
    x = _input(batch=3, layout=layout)
    out = fast.set_backend(backend).train()(x)
    assert_tolerance(out, ref64.train()(x.double()), tv.train()(x), f"{arch} train-mode logits")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_train_steps_match_torchvision_fp64(arch, layout, backend):
    """Every parameter's gradient, then parameters and running stats after 3 SGD steps.

    Whole-network gradients of a random model are too ill-conditioned for the
    fp32 tolerance rule (the stock fp32 path is itself percents off float64), so
    the training semantics are compared in float64, where they must agree tightly;
    the per-op fp32/bf16 accuracy is tested op by op.
    """
    tv, fast = _pair(arch)
    tv, fast = tv.double().train(), fast.double().train().set_backend(backend)
    models = {"fast": fast, "stock": tv}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}
    for step in range(3):
        x = _input(batch=2, size=48, layout=layout, dtype=torch.float64)
        target = torch.tensor([1, 4])
        for key, model in models.items():
            optimizers[key].zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
        if step == 0:
            stock_params = dict(tv.named_parameters())
            for name, p in fast.named_parameters():
                torch.testing.assert_close(p.grad, stock_params[name].grad, rtol=1e-7, atol=1e-9,
                                           msg=lambda m, name=name: f"{arch} gradient of {name}: {m}")
        for optimizer in optimizers.values():
            optimizer.step()
    stock_state = tv.state_dict()
    for name, value in fast.state_dict().items():
        torch.testing.assert_close(value, stock_state[name], rtol=1e-7, atol=1e-9,
                                   msg=lambda m, name=name: f"{arch} {name} after 3 steps: {m}")
    assert int(fast.bn1.num_batches_tracked) == 3


def test_state_dict_round_trip_strict():
    tv, fast = _pair("resnet50")
    fast2 = resnet_fast.resnet50(num_classes=10)
    fast2.load_state_dict(tv.state_dict(), strict=True)
    tv2 = torchvision.models.resnet50(num_classes=10)
    tv2.load_state_dict(fast2.state_dict(), strict=True)
    for key, value in tv.state_dict().items():
        assert torch.equal(value, tv2.state_dict()[key]), f"{key} changed in the round trip"


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d", "wide_resnet50_2"])
def test_from_and_to_torchvision_infer_config(arch):
    tv = getattr(torchvision.models, arch)(num_classes=7, replace_stride_with_dilation=None
                                           if arch == "resnet18" else [False, True, True])
    fast = resnet_fast.FastResNet.from_torchvision(tv)
    assert fast.config["num_classes"] == 7
    back = fast.to_torchvision()
    assert type(back) is torchvision.models.ResNet
    x = _input(batch=1, size=48)
    tv.eval(), back.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), tv(x), rtol=0, atol=0)
        torch.testing.assert_close(fast(x), tv(x), rtol=1e-4, atol=1e-4)


def test_small_input_stem():
    model = resnet_fast.resnet18(num_classes=10, small_input=True).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    tv = model.to_torchvision()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x), tv.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_folded_weights_are_never_stale(backend):
    tv, fast = _pair("resnet18")
    fast.eval().set_backend(backend)
    original = copy.deepcopy(fast.state_dict())
    x = _input(batch=1, size=32)
    with torch.no_grad():
        before = fast(x)
        fast.layer1[0].bn1.weight.mul_(1.5)  # in-place edit: bumps the version counter
        after_weight = fast(x)
        fast.layer2[0].bn2.running_mean.add_(0.3)
        after_buffer = fast(x)
        tv.load_state_dict(fast.state_dict())
        expected = tv.eval()(x)
    assert not torch.allclose(before, after_weight), "changing a BN weight did not change the output"
    assert not torch.allclose(after_weight, after_buffer), "changing a running mean did not change the output"
    torch.testing.assert_close(after_buffer, expected, rtol=1e-4, atol=1e-4)
    # A state_dict load and a dtype move are seen as well.
    fast.load_state_dict(original)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), before, rtol=1e-4, atol=1e-4)
        assert fast.double()(x.double()).dtype == torch.float64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_models_with_cached_folds_copy_and_pickle(backend):
    """An EMA copy or a torch.save of a model that has run in eval (its folds and packed weights cached)."""
    _, fast = _pair("resnet18")
    fast.eval().set_backend(backend)
    x = _input(batch=1, size=32)
    with torch.no_grad():
        expected = fast(x)
        twin = copy.deepcopy(fast)
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        twin.layer1[0].bn1.weight.mul_(1.5)  # the copy's fold must follow its own parameters
        assert torch.equal(loaded(x), expected)
        assert torch.equal(fast(x), expected)
        assert not torch.allclose(twin(x), expected), "the copy reused the original's cached fold"


def test_eval_gradients_flow_through_the_fold():
    """Eval mode with autograd on (e.g. frozen-BN fine-tuning): gradients reach conv and BN parameters."""
    tv, fast = _pair("resnet18")
    tv.eval(), fast.eval()
    x = _input(batch=2, size=32)
    fast(x).sum().backward()
    tv(x).sum().backward()
    for (name, p), (_, q) in zip(fast.named_parameters(), tv.named_parameters()):
        assert p.grad is not None, f"no gradient reached {name} in eval mode"
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=f"eval-mode gradient of {name}")


def test_momentum_none_and_custom_eps_carry_over():
    tv = torchvision.models.resnet18(num_classes=3)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum, m.eps = None, 1e-3
    fast = resnet_fast.FastResNet.from_torchvision(tv)
    for _ in range(2):
        x = _input(batch=2, size=32)
        torch.testing.assert_close(fast.train()(x), tv.train()(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.bn1.running_var, tv.bn1.running_var, rtol=1e-5, atol=1e-6)


def test_unsupported_configurations_are_rejected():
    with pytest.raises(TypeError, match="not a torchvision ResNet"):
        resnet_fast.FastResNet.from_torchvision(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown backend"):
        resnet_fast.resnet18(backend="cudnn")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_bf16_follows_stock(backend):
    """Under torch.autocast the units compute in bf16 like stock convs, and training steps run."""
    tv, fast = _pair("resnet18")
    fast.set_backend(backend)
    x = _input(batch=2, size=32)
    for mode in ("eval", "train"):
        tv.train(mode == "train"), fast.train(mode == "train")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, stock = fast(x), tv(x)
        ref64 = copy.deepcopy(tv).double().train(mode == "train")(x.double())
        assert_tolerance(out.float(), ref64, stock.float(), f"autocast {mode} logits")
        if mode == "train":
            out.float().sum().backward()
            assert all(p.grad is not None for p in fast.parameters())
