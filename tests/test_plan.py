"""Execution plans (resnet_fast.models.plan): one decision per input signature, by measurement."""

from __future__ import annotations

import copy
import json
import pickle
import threading

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast import _extension
from resnet_fast.models import plan as plan_module
from resnet_fast.models.resnet import FastResNet
from resnet_fast.ops import cpu_select
from tests.fixtures import randomize_bn
from tests.numerics import assert_tolerance

pytestmark = pytest.mark.skipif(_extension.extension() is None, reason="needs resnet_fast._C (the CPU kernels)")

KERNEL_NAMES = set(plan_module.KERNELS)
PLAN_SETTINGS = ("RESNET_FAST_CPU_BLOCKED", "RESNET_FAST_CPU_CONV3X3", "RESNET_FAST_BACKEND", "RESNET_FAST_PLAN_CACHE")


@pytest.fixture(autouse=True)
def _default_settings(monkeypatch):
    for name in PLAN_SETTINGS:
        monkeypatch.delenv(name, raising=False)


def _pair(arch: str = "resnet18"):
    torch.manual_seed(0)
    tv = randomize_bn(getattr(torchvision.models, arch)(num_classes=10)).eval()
    return tv, FastResNet.from_torchvision(tv).eval()


def _images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _fake_times(monkeypatch, slower_layout: str) -> list:
    """Every kernel of ``slower_layout`` takes 2 s, the others 1 s; the candidates still run once."""
    timed = []

    def seconds(key, run):
        kernel = key.split()[0]
        timed.append(kernel)
        run()
        if kernel in plan_module.KERNELS:
            return 2.0 if plan_module.KERNELS[kernel][0] == slower_layout else 1.0
        return 0.0

    monkeypatch.setattr(cpu_select, "seconds", seconds)
    return timed


def test_explain_names_a_measured_or_ruled_kernel_for_every_unit():
    tv, fast = _pair("resnet50")
    x = _images()
    with torch.inference_mode():
        plan = fast.explain(x)
        out = fast(x)
    rows = plan.rows()
    assert plan.kind == "planned trunk", plan.why
    assert len(rows) == 1 + 16 * 3 + 4, [row["unit"] for row in rows]
    assert [row["unit"] for row in rows[:3]] == ["conv1", "layer1.0.downsample.0", "layer1.0.conv1"]
    for row in rows:
        assert row["kernel"] in KERNEL_NAMES, row
        assert row["why"].startswith(("measured:", "rule:", "only kernel")), row
    three_by_three = [row for row in rows if row["unit"].endswith("conv2") and row["input"][2:] == row["output"][2:]]
    assert three_by_three and all(row["why"].startswith("measured:") for row in three_by_three), three_by_three
    assert plan.layout in ("channels_last", "blocked8") and "measured" in plan.why, plan.why
    text = str(plan)
    assert "layer4.2.conv3" in text and plan.signature in text
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()(x.double())
        stock = tv(x)
    assert_tolerance(out, ref64, stock, "resnet50 planned trunk")


@pytest.mark.parametrize("slower", ["channels_last", "blocked8"])
def test_auto_takes_the_layout_whose_units_measured_faster(slower, monkeypatch):
    tv, fast = _pair()
    timed = _fake_times(monkeypatch, slower)
    x = _images()
    with torch.no_grad():
        plan = fast.explain(x)
        out = fast(x)
        ref64 = copy.deepcopy(tv).double()(x.double())
        stock = tv(x)
    assert plan.layout != slower, plan.why
    assert {"onednn", "blocked_direct", "winograd", "blocked_winograd"} <= set(timed), sorted(set(timed))
    expected = {"channels_last": {"onednn", "winograd"}, "blocked8": {"blocked_direct", "blocked_winograd"}}
    trunk_kernels = {row["kernel"] for row in plan.rows()[1:]}
    assert trunk_kernels <= expected[plan.layout], (plan.layout, trunk_kernels)
    assert_tolerance(out, ref64, stock, f"resnet18 on {plan.layout}")


@pytest.mark.parametrize("setting,value,allowed", [
    ("RESNET_FAST_CPU_BLOCKED", "0", {"onednn", "winograd"}),
    ("RESNET_FAST_CPU_BLOCKED", "1", {"blocked_direct", "blocked_winograd"}),
    ("RESNET_FAST_CPU_CONV3X3", "onednn", {"onednn", "blocked_direct"}),
])
def test_settings_force_the_choice(setting, value, allowed, monkeypatch):
    tv, fast = _pair()
    monkeypatch.setenv(setting, value)
    x = _images()
    with torch.no_grad():
        plan = fast.explain(x)
        out = fast(x)
        ref64 = copy.deepcopy(tv).double()(x.double())
        stock = tv(x)
    kernels = {row["kernel"] for row in plan.rows()[1:]}
    assert kernels <= allowed, (setting, value, kernels)
    if setting == "RESNET_FAST_CPU_BLOCKED":
        assert f"{setting}={value}" in plan.why, plan.why
    assert_tolerance(out, ref64, stock, f"{setting}={value}")


def test_winograd_forced_runs_winograd_on_every_3x3_stride_1_unit(monkeypatch):
    _, fast = _pair()
    monkeypatch.setenv("RESNET_FAST_CPU_CONV3X3", "winograd")
    with torch.no_grad():
        rows = fast.explain(_images()).rows()
    for row in rows[1:]:
        stride_1_3x3 = row["unit"].endswith("conv2") or (row["unit"].endswith("conv1") and row["input"] == row["output"])
        if stride_1_3x3 and row["input"][2:] == row["output"][2:]:
            assert row["kernel"] in ("winograd", "blocked_winograd"), row


def test_running_a_plan_decides_nothing(monkeypatch):
    _, fast = _pair()
    x = _images()
    with torch.no_grad():
        expected = fast(x)

        def no_decisions(*args, **kwargs):
            raise AssertionError("a kept plan timed or chose a kernel")

        monkeypatch.setattr(cpu_select, "seconds", no_decisions)
        monkeypatch.setattr(plan_module, "build_plan", no_decisions)
        from resnet_fast.ops import extension

        monkeypatch.setattr(extension, "choose_conv3x3", no_decisions)
        torch.testing.assert_close(fast(x), expected, rtol=0, atol=0)


def test_plans_are_kept_per_signature_and_rebuilt_on_change(monkeypatch):
    _, fast = _pair()
    x = _images()
    with torch.no_grad():
        first = plan_module.plan_for(fast, x)
        assert plan_module.plan_for(fast, x) is first, "the same signature must reuse its plan"
        assert plan_module.plan_for(fast, _images(batch=1)) is not first, "another batch size needs its own plan"
        assert plan_module.plan_for(fast, x.contiguous(memory_format=torch.channels_last)) is not first
        monkeypatch.setenv("RESNET_FAST_CPU_BLOCKED", "0")
        assert plan_module.plan_for(fast, x).layout == "channels_last"
        monkeypatch.delenv("RESNET_FAST_CPU_BLOCKED")
        assert plan_module.plan_for(fast, x) is first
        fast.layer1[0].conv1 = copy.deepcopy(fast.layer1[0].conv1)
        replanned = plan_module.plan_for(fast, x)
        assert replanned is not first and replanned.blocks[0].main[0].conv is fast.layer1[0].conv1
    hooked = []
    handle = fast.layer2.register_forward_hook(lambda module, args, output: hooked.append(output.shape))
    with torch.no_grad():
        fast(x)
        assert plan_module.plan_for(fast, x).kind == "per call"
    handle.remove()
    assert hooked == [torch.Size([2, 128, 8, 8])], "a hook on a stage must see it run"
    with torch.no_grad():
        assert plan_module.plan_for(fast, x) is replanned


def test_plans_are_not_copied_or_pickled():
    _, fast = _pair()
    x = _images()
    with torch.no_grad():
        expected = fast(x)
        for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert not plan_module.plan_cache(copied).plans, "a copy must plan for its own modules"
            torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)


def test_training_plan_is_per_call_and_explain_leaves_running_stats_alone():
    _, fast = _pair()
    fast.train()
    x = _images()
    before = {name: t.clone() for name, t in fast.state_dict().items()}
    plan = fast.explain(x)
    assert plan.kind == "per call" and "autograd" in plan.why, plan.why
    kernels = {row["kernel"] for row in plan.rows()}
    assert kernels <= {"onednn+bn_act_train", "gemm+bn_act_train"}, kernels
    for name, tensor in fast.state_dict().items():
        assert torch.equal(tensor, before[name]), f"explain changed {name}"


@pytest.mark.parametrize("case", ["float64", "autocast", "reference"])
def test_per_call_explain_records_what_ran(case):
    _, fast = _pair()
    x = _images()
    if case == "float64":
        fast.double()
        x = x.double()
    if case == "reference":
        fast.set_backend("reference")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        plan = fast.explain(x)
    assert plan.kind == "per call", plan.why
    kernels = {row["kernel"] for row in plan.rows()}
    expected = {"float64": {"vendor+epilogue"}, "autocast": {"onednn", "vendor+epilogue"}, "reference": {"reference"}}
    assert kernels and kernels <= expected[case], (case, kernels)


def test_resnext_runs_a_channels_last_trunk():
    """Grouped 3x3 convs have no blocked kernel: the trunk stays planned, on oneDNN, channels_last."""
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnext50_32x4d(num_classes=10)).eval()
    fast = FastResNet.from_torchvision(tv).eval()
    x = _images(batch=1, size=32)
    with torch.no_grad():
        plan = fast.explain(x)
        out = fast(x)
        ref64 = copy.deepcopy(tv).double()(x.double())
        stock = tv(x)
    assert plan.kind == "planned trunk" and plan.layout == "channels_last", plan.why
    assert "no blocked kernel" in plan.why, plan.why
    assert_tolerance(out, ref64, stock, "resnext50 planned channels_last trunk")


def test_disk_cache_lets_a_new_process_plan_without_timing(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_PLAN_CACHE", "1")
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_select, "_seconds", {})
    monkeypatch.setattr(cpu_select, "_disk", None)
    _, fast = _pair()
    with torch.no_grad():
        fast(_images())
    stored = json.loads((tmp_path / "cpu_timings.json").read_text())
    assert list(stored) == [cpu_select.machine_tag()], list(stored)
    keys = stored[cpu_select.machine_tag()]
    assert any(key.startswith("blocked_winograd ") for key in keys), sorted(keys)[:5]
    cpu_select.forget()  # as a new process: nothing in memory, the file on disk

    def never(*args):
        raise AssertionError("a time on disk was measured again")

    key = next(iter(keys))
    assert cpu_select.seconds(key, never) == keys[key]
    monkeypatch.setenv("RESNET_FAST_PLAN_CACHE", "0")
    cpu_select.forget()
    assert cpu_select.known_seconds(key) is None, "with the cache off, nothing is read from disk"


def test_threads_sharing_a_new_model_agree():
    _, fast = _pair()
    x = _images()
    with torch.no_grad():
        expected = copy.deepcopy(fast)(x)
    outputs, errors = [None] * 3, []

    def serve(index: int) -> None:
        try:
            with torch.inference_mode():
                outputs[index] = fast(x)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(plan_module.plan_cache(fast).plans) == 1, "one signature, one plan"


def test_explain_rejects_bad_input():
    _, fast = _pair()
    with pytest.raises(ValueError, match=r"explain expects images of shape \(N, 3, H, W\), got \(2, 4, 8, 8\)"):
        fast.explain(torch.randn(2, 4, 8, 8))


def test_import_does_not_load_the_extension():
    import subprocess
    import sys

    code = ("import sys, resnet_fast; m = resnet_fast.resnet18(); "
            "assert 'resnet_fast._C' not in sys.modules, 'import and construction loaded _C'; "
            "import torch; m.eval()(torch.randn(1, 3, 32, 32)); "
            "assert 'resnet_fast._C' in sys.modules, 'the first pass must load _C'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert resnet_fast.__name__ == "resnet_fast"


def test_bfloat16_model_runs_a_planned_onednn_trunk():
    tv, fast = _pair()
    fast.bfloat16()
    x = _images()
    with torch.no_grad():
        plan = fast.explain(x.bfloat16())
        out = fast(x.bfloat16())
        ref64 = copy.deepcopy(tv).double()(x.double())
        stock = copy.deepcopy(tv).bfloat16()(x.bfloat16())
    assert plan.kind == "planned trunk" and plan.layout == "channels_last", plan.why
    assert {row["kernel"] for row in plan.rows()} == {"onednn"}, plan.rows()
    assert_tolerance(out, ref64, stock, "resnet18 bfloat16 planned trunk")
