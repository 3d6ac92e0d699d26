"""FastResNet where torchvision's ResNet goes: other norm layers, detection backbones, FX, TorchScript."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FrozenBatchNorm2d

import resnet_fast
from resnet_fast import backends
from tests.numerics import assert_tolerance, errors
from tests.fixtures import assert_buffers_match, randomize_bn
from tests.test_contexts import image_batch

CPU_BACKENDS = [name for name in ("reference", "extension") if backends.is_available(name, "cpu")]


def frozen_pair(arch: str = "resnet18") -> tuple[nn.Module, resnet_fast.FastResNet]:
    torch.manual_seed(0)
    tv = randomize_bn(getattr(torchvision.models, arch)(num_classes=10, norm_layer=FrozenBatchNorm2d))
    fast = getattr(resnet_fast, arch)(num_classes=10, norm_layer=FrozenBatchNorm2d)
    fast.load_state_dict(tv.state_dict(), strict=True)
    return tv, fast


# ----------------------------------------------------------------------------------------- norm layers


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_frozen_batch_norm_is_folded_in_both_modes(mode, backend):
    tv, fast = frozen_pair()
    tv.train(mode == "train"), fast.train(mode == "train").set_backend(backend)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    x = image_batch(batch=2)
    out = fast(x)
    with torch.no_grad():
        stock, ref64 = tv(x), copy.deepcopy(tv).double()(x.double())
    assert_tolerance(out.detach(), ref64, stock, f"FrozenBatchNorm2d {mode} logits")
    for key, value in fast.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed: FrozenBatchNorm2d never updates"
    if mode == "train":
        out.square().sum().backward()
        stock_out = tv(x)
        stock_out.square().sum().backward()
        ref = copy.deepcopy(tv).double()
        ref(x.double()).square().sum().backward()
        for (name, p), q, r in zip(fast.named_parameters(), tv.parameters(), ref.parameters()):
            assert_tolerance(p.grad, r.grad, q.grad, f"gradient of {name}")


def test_frozen_batch_norm_resnet50_builds_and_converts():
    tv, fast = frozen_pair("resnet50")
    assert isinstance(fast.layer1[0].bn3, FrozenBatchNorm2d)
    converted = resnet_fast.FastResNet.from_torchvision(tv)
    assert isinstance(converted.layer4[0].downsample[1], FrozenBatchNorm2d)
    assert isinstance(converted.to_torchvision().layer2[1].bn2, FrozenBatchNorm2d)
    x = image_batch(batch=1, size=64)
    with torch.inference_mode():
        assert_tolerance(converted.eval()(x), copy.deepcopy(tv).double().eval()(x.double()), tv.eval()(x),
                         "from_torchvision of a FrozenBatchNorm2d resnet50")


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, channels)


@pytest.mark.parametrize("norm_layer", [group_norm, nn.SyncBatchNorm], ids=["GroupNorm", "SyncBatchNorm"])
def test_other_norm_layers_run_unfused_with_one_warning(norm_layer):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10, norm_layer=norm_layer).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = resnet_fast.resnet18(num_classes=10, norm_layer=norm_layer).eval()
    unfused = [w for w in caught if issubclass(w.category, resnet_fast.UnfusedUnitsWarning)]
    assert len(unfused) == 1, f"expected one UnfusedUnitsWarning, got {[str(w.message) for w in caught]}"
    message = str(unfused[0].message)
    assert "20 of 20" in message and "layer1.0.bn1" in message, message
    fast.load_state_dict(tv.state_dict(), strict=True)
    x = image_batch()
    with torch.inference_mode():
        assert_tolerance(fast(x), copy.deepcopy(tv).double()(x.double()), tv(x), "unfused-norm logits")


def test_mixed_norm_layers_warn_only_for_the_unfused_units():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    tv.layer2[1].bn2 = nn.GroupNorm(4, 128)
    with pytest.warns(resnet_fast.UnfusedUnitsWarning, match=r"1 of 20 .*GroupNorm.*layer2\.1\.bn2"):
        fast = resnet_fast.FastResNet.from_torchvision(tv.eval())
    x = image_batch()
    with torch.inference_mode():
        assert_tolerance(fast(x), copy.deepcopy(tv).double()(x.double()), tv(x), "one GroupNorm unit")


def test_bad_norm_layer_fails_as_torchvision_does():
    with pytest.raises(TypeError):
        torchvision.models.resnet18(norm_layer=nn.GroupNorm)  # GroupNorm(channels) misses num_channels
    with pytest.raises(TypeError):
        resnet_fast.resnet18(norm_layer=nn.GroupNorm)
    with pytest.raises(TypeError, match="norm_layer"):
        resnet_fast.resnet18(norm_layer="batchnorm")


@pytest.mark.slow
def test_faster_rcnn_backbone_from_fastresnet():
    """torchvision's detection builder path (`_resnet_fpn_extractor`) takes a FastResNet with
    FrozenBatchNorm2d and gives torchvision's features and detections with the same weights."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    torch.manual_seed(0)
    tv_trunk = randomize_bn(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d))
    fast_trunk = resnet_fast.resnet50(norm_layer=FrozenBatchNorm2d)
    fast_trunk.load_state_dict(tv_trunk.state_dict(), strict=True)
    detectors = []
    for trunk in (tv_trunk, fast_trunk):
        torch.manual_seed(1)  # the same FPN and heads for both
        detectors.append(FasterRCNN(_resnet_fpn_extractor(trunk, 3), num_classes=5, min_size=160, max_size=160,
                                    box_score_thresh=0.0).eval())
    tv_detector, fast_detector = detectors
    fast_detector.load_state_dict(tv_detector.state_dict(), strict=True)
    images = [torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(4))]
    tensor = tv_detector.transform(images)[0].tensors
    with torch.inference_mode():
        body64 = copy.deepcopy(tv_detector.backbone.body).double()(tensor.double())
        tv_body, fast_body = tv_detector.backbone.body(tensor), fast_detector.backbone.body(tensor)
        for name in tv_body:  # the trunk's own outputs: the project's tolerance rule
            assert_tolerance(fast_body[name], body64[name], tv_body[name], f"trunk output {name}")
        fpn64 = copy.deepcopy(tv_detector.backbone).double()(tensor.double())
        tv_fpn, fast_fpn = tv_detector.backbone(tensor), fast_detector.backbone(tensor)
        for name in tv_fpn:  # stock FPN layers on top amplify single elements: the relative error only
            fast_rel, stock_rel = errors(fast_fpn[name], fpn64[name])[1], errors(tv_fpn[name], fpn64[name])[1]
            assert fast_rel <= 2 * stock_rel + 1e-6, f"FPN level {name}: relative error {fast_rel:.3e}, " \
                                                     f"torchvision's {stock_rel:.3e}"
        tv_out, fast_out = tv_detector(images)[0], fast_detector(images)[0]
    assert len(tv_out["boxes"]) > 0, "the test needs detections to compare"
    top = min(10, len(tv_out["boxes"]))
    assert torch.equal(fast_out["labels"][:top], tv_out["labels"][:top]), "top detections' labels differ"
    torch.testing.assert_close(fast_out["boxes"][:top], tv_out["boxes"][:top], rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(fast_out["scores"][:top], tv_out["scores"][:top], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------- FX and TorchScript


@pytest.fixture(scope="module")
def pair18() -> tuple[nn.Module, resnet_fast.FastResNet]:
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    return tv, resnet_fast.FastResNet.from_torchvision(tv).eval()


def test_fx_symbolic_trace_gives_torchvisions_graph(pair18):
    tv, fast = pair18
    traced, tv_traced = torch.fx.symbolic_trace(fast), torch.fx.symbolic_trace(tv)
    assert [n.name for n in traced.graph.nodes] == [n.name for n in tv_traced.graph.nodes], \
        "traced node names differ from torchvision's"
    x = image_batch()
    with torch.inference_mode():
        assert_tolerance(traced(x), copy.deepcopy(tv).double()(x.double()), tv(x), "FX-traced logits")


def test_create_feature_extractor_matches_torchvision(pair18):
    tv, fast = pair18
    nodes = {"layer1.1.relu_1": "low", "layer3": "mid", "layer4": "high", "fc": "logits"}
    mine, theirs = create_feature_extractor(fast, nodes), create_feature_extractor(tv, nodes)
    ref = create_feature_extractor(copy.deepcopy(tv).double(), nodes)
    x = image_batch()
    with torch.inference_mode():
        got, stock, ref64 = mine(x), theirs(x), ref(x.double())
    assert list(got) == list(stock)
    for name in got:
        assert_tolerance(got[name], ref64[name], stock[name], f"feature {name}")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jit_trace_matches_torchvision(mode, pair18):
    """The trace runs the model once; torchvision and its float64 twin run the same call, then all
    take a second input: outputs and (train) running statistics agree."""
    training = mode == "train"
    tv, tv64 = (copy.deepcopy(pair18[0]).train(training) for _ in range(2))
    tv64.double()
    fast = resnet_fast.FastResNet.from_torchvision(tv)
    first, second = image_batch(batch=3, size=48), image_batch(batch=3, size=56)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fast, first, check_trace=False)
    with torch.no_grad():
        tv(first), tv64(first.double())
        stock, ref64 = tv(second), tv64(second.double())
        out = traced(second)
    assert_tolerance(out, ref64, stock, f"jit.trace {mode} logits")
    assert_buffers_match(fast, tv, tv64, f"jit.trace {mode}")


def test_jit_script_compiles_torchvisions_forward(pair18):
    tv, fast = pair18
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(fast)
    x = image_batch()
    with torch.inference_mode():
        assert_tolerance(scripted(x), copy.deepcopy(tv).double()(x.double()), tv(x), "scripted logits")
    assert isinstance(fast.layer1[0], resnet_fast.BasicBlock), "scripting must leave the model as it was"
