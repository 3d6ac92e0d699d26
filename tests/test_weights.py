"""Pretrained weights: the factories take torchvision's ``weights=`` values, errors and checkpoint cache.

Offline: each test points TORCH_HOME at its tmp_path, writes a seeded random torchvision
checkpoint under the file name torchvision's loader looks for, and makes any download fail.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights

import resnet_fast
from tests.fixtures import NetworkAccess, checkpoint_path, offline_torch_hub, randomize_bn
from tests.numerics import assert_tolerance

ROOT = Path(__file__).resolve().parents[1]


def _random_torchvision(arch: str, num_classes: int, seed: int) -> nn.Module:
    """torchvision's ``arch`` with seeded random init and non-trivial BN, so a checkpoint is unlike a fresh init."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    randomize_bn(model, seed)
    return model


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Any], dict[str, torch.Tensor]]:
    """``hub(arch, weights)`` writes a random ``arch`` checkpoint where torch.hub looks for ``weights.url``."""
    checkpoints = offline_torch_hub(monkeypatch, tmp_path, "the checkpoint is not in the cache")

    def place(arch: str, weights: Any) -> dict[str, torch.Tensor]:
        state = _random_torchvision(arch, len(weights.meta["categories"]), seed=1234).state_dict()
        torch.save(state, checkpoint_path(checkpoints, weights))
        return state

    return place


def _assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected), "state_dict keys differ from the checkpoint's"
    for key, value in expected.items():
        assert torch.equal(state[key], value), f"{key} was not loaded from the checkpoint"


def _assert_eval_matches_torchvision(fast: nn.Module, tv: nn.Module) -> None:
    """The project's rule: FastResNet within 2x the stock fp32 error against a float64 torchvision run."""
    fast, tv = fast.eval(), tv.eval()
    tv64 = copy.deepcopy(tv).double()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out, stock, ref64 = fast(x), tv(x), tv64(x.double())
    assert_tolerance(out, ref64, stock, name="logits")


def _raised(fn: Callable[[], Any]) -> BaseException:
    """The exception ``fn()`` raises (fails the test if it raises nothing)."""
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize("weights", [ResNet18_Weights.IMAGENET1K_V1, "DEFAULT", "IMAGENET1K_V1",
                                     "ResNet18_Weights.IMAGENET1K_V1"],
                         ids=["enum", "DEFAULT", "IMAGENET1K_V1", "full-name"])
def test_resnet18_loads_the_cached_checkpoint(hub, weights):
    expected = hub("resnet18", ResNet18_Weights.IMAGENET1K_V1)
    model = resnet_fast.resnet18(weights=weights)
    assert isinstance(model, resnet_fast.FastResNet)
    _assert_state_equal(model, expected)


def test_resnet18_eval_matches_torchvision_with_the_same_weights(hub):
    hub("resnet18", ResNet18_Weights.IMAGENET1K_V1)
    fast = resnet_fast.resnet18(weights="DEFAULT")
    tv = torchvision.models.resnet18(weights="DEFAULT")
    _assert_state_equal(fast, tv.state_dict())
    _assert_eval_matches_torchvision(fast, tv)


@pytest.mark.slow
def test_resnet50_bottleneck_loads_imagenet1k_v2_by_name(hub):
    expected = hub("resnet50", ResNet50_Weights.IMAGENET1K_V2)
    fast = resnet_fast.resnet50(weights="IMAGENET1K_V2")
    _assert_state_equal(fast, expected)
    _assert_eval_matches_torchvision(fast, torchvision.models.resnet50(weights="IMAGENET1K_V2"))


@pytest.mark.parametrize("weights", [ResNet50_Weights.IMAGENET1K_V1, "BOGUS", "ResNet50_Weights.IMAGENET1K_V1",
                                     "resnet18_weights.IMAGENET1K_V1"],
                         ids=["other-arch-enum", "unknown-name", "other-arch-full-name", "wrong-case"])
def test_wrong_weights_raise_what_torchvision_raises(hub, weights):
    hub("resnet18", ResNet18_Weights.IMAGENET1K_V1)
    expected = _raised(lambda: torchvision.models.resnet18(weights=weights))
    got = _raised(lambda: resnet_fast.resnet18(weights=weights))
    assert (type(got), str(got)) == (type(expected), str(expected)), (
        f"resnet_fast raised {type(got).__name__}({got}), torchvision {type(expected).__name__}({expected})")


def test_num_classes_is_checked_against_the_weights_like_torchvision(hub):
    expected_state = hub("resnet18", ResNet18_Weights.IMAGENET1K_V1)
    expected = _raised(lambda: torchvision.models.resnet18(weights="DEFAULT", num_classes=10))
    got = _raised(lambda: resnet_fast.resnet18(weights="DEFAULT", num_classes=10))
    assert (type(got), str(got)) == (type(expected), str(expected)), (
        f"resnet_fast raised {type(got).__name__}({got}), torchvision {type(expected).__name__}({expected})")
    assert "1000" in str(got) and "10" in str(got), f"the message should name both values: {got}"
    _assert_state_equal(resnet_fast.resnet18(weights="DEFAULT", num_classes=1000), expected_state)


def test_resnext_groups_are_checked_like_torchvision():
    expected = _raised(lambda: torchvision.models.resnext50_32x4d(groups=16))
    got = _raised(lambda: resnet_fast.resnext50_32x4d(groups=16))
    assert (type(got), str(got)) == (type(expected), str(expected))


def test_a_cache_miss_goes_to_torch_hub_download(hub, tmp_path):
    """Nothing cached: the loader asks torch.hub to download weights.url into TORCH_HOME (here, it fails)."""
    with pytest.raises(NetworkAccess) as info:
        resnet_fast.resnet18(weights="DEFAULT")
    target = tmp_path / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.DEFAULT.url)
    assert ResNet18_Weights.DEFAULT.url in str(info.value) and str(target) in str(info.value), str(info.value)


def _warning_messages(fn: Callable[[], Any]) -> tuple[Any, list[tuple[type, str]], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [(w.category, str(w.message)) for w in caught], [w.filename for w in caught]


@pytest.mark.parametrize("pretrained", [True, False])
def test_legacy_pretrained_keyword_like_torchvision(hub, pretrained):
    expected_state = hub("resnet18", ResNet18_Weights.IMAGENET1K_V1)
    tv, tv_warnings, _ = _warning_messages(lambda: torchvision.models.resnet18(pretrained=pretrained))
    fast, fast_warnings, files = _warning_messages(lambda: resnet_fast.resnet18(pretrained=pretrained))
    assert fast_warnings == tv_warnings, f"resnet_fast warned {fast_warnings}, torchvision {tv_warnings}"
    assert files == [__file__] * len(files), f"the warnings should point at the caller, not at {files}"
    if pretrained:
        _assert_state_equal(fast, expected_state)
    else:
        assert not torch.equal(fast.conv1.weight, expected_state["conv1.weight"]), "pretrained=False loaded weights"


def test_weights_without_torchvision_is_one_sentence(monkeypatch):
    for name in ("torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, name, None)  # `import torchvision` now fails as if not installed
    with pytest.raises(ImportError, match=r"pip install torchvision$"):
        resnet_fast.resnet18(weights="DEFAULT")
    assert isinstance(resnet_fast.resnet18(num_classes=3), resnet_fast.FastResNet), "no weights must not need it"


def test_import_and_build_never_import_torchvision():
    code = ("import sys, resnet_fast; resnet_fast.resnext50_32x4d(num_classes=3); "
            "assert 'torchvision' not in sys.modules, 'resnet_fast imported torchvision'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 0, result.stderr
