"""torch.export and ONNX export of FastResNet keep working, with torchvision's numbers.

One ResNet-18 (10 classes, 2x3x64x64 input, BatchNorm weights and running statistics
randomised so that folding matters) copied from a torchvision model, exported and run,
compared with torchvision by the project's tolerance rule (``tests/numerics.py``).

What the exported graphs contain (found by running them, pinned here):

* ``torch.export.export(m, (x,))`` with grad enabled (the plain call): every unit takes the
  differentiable reference path (the parameters require grad), so the graph is plain aten ops,
  ``conv2d`` + ``relu`` + ``add`` with the BatchNorm fold computed in the graph from the
  lifted parameters and buffers (one ``rsqrt`` per unit), no ``resnet_fast`` op.
* The same under ``torch.no_grad()`` or ``torch.inference_mode()``, whatever the CPU's 3x3
  algorithm: while ``torch.export`` traces, every unit takes the reference ops
  (``resnet_fast.backends.resolve``), so an exported program is plain aten, portable to
  ONNX, AOTInductor or a machine without resnet_fast.
* Train mode: ``conv2d`` + ``batch_norm`` per unit, with the running-stat updates; the forward,
  the running statistics and the backward match torchvision.
* ONNX, dynamo exporter: standard ONNX ops only, with grad enabled and under ``torch.no_grad()``.
* ONNX, TorchScript exporter (``dynamo=False``): works with grad enabled, under no_grad and under
  inference_mode: while ``torch.jit.trace`` records, FastResNet runs torchvision's own forward over
  its stock modules, so the trace (and the ONNX graph) is torchvision's.
"""

from __future__ import annotations

import collections
import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import resnet_fast
from tests.numerics import assert_tolerance

torchvision = pytest.importorskip("torchvision", reason="torchvision is the reference (pip install torchvision)")

NUM_CLASSES = 10
INPUT_SHAPE = (2, 3, 64, 64)
UNITS = 20  # conv + BN units of ResNet-18: stem, 16 in the blocks, 3 downsamples
BN_OPS = ("aten.batch_norm", "aten._native_batch_norm_legit", "aten.native_batch_norm",
          "aten._native_batch_norm_legit_no_training", "aten.cudnn_batch_norm")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# The settings that pick kernels: the graphs pinned here are those of the defaults (and of the 3x3
# algorithm each test sets), whatever the environment running the tests says.
KERNEL_SETTINGS = ("RESNET_FAST_BACKEND", "RESNET_FAST_CPU_CONV", "RESNET_FAST_CPU_CONV3X3", "RESNET_FAST_CPU_BLOCKED")
EXTENSION = resnet_fast.is_available("extension", "cpu")
needs_extension = pytest.mark.skipif(
    not EXTENSION, reason=f"the fused ops need resnet_fast._C: {resnet_fast.unavailable_reason('extension', 'cpu')}")


@pytest.fixture(scope="module", autouse=True)
def _default_kernel_settings():
    with pytest.MonkeyPatch.context() as patch:
        for name in KERNEL_SETTINGS:
            patch.delenv(name, raising=False)
        yield


def _randomise_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """BN affine parameters and running statistics away from 1/0, so a wrong fold shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)


def _build(training: bool) -> SimpleNamespace:
    """torchvision's ResNet-18 and FastResNet copies of it, plus torchvision's float64 and float32 outputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tv = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    _randomise_batch_norms(tv, generator)
    tv.train(training)
    x = torch.randn(INPUT_SHAPE, generator=generator)
    fast = resnet_fast.FastResNet.from_torchvision(copy.deepcopy(tv))
    assert fast.training == training
    tv64 = copy.deepcopy(tv).double()
    tv32 = copy.deepcopy(tv)
    with torch.no_grad():
        ref64 = tv64(x.double())
        stock = tv32(x)
    # After one call: tv64 / tv32 hold torchvision's updated running statistics in train mode.
    return SimpleNamespace(tv=tv, fast=fast, x=x, ref64=ref64, stock=stock, tv64=tv64, tv32=tv32)


@pytest.fixture(scope="module")
def eval_case() -> SimpleNamespace:
    return _build(training=False)


def graph_ops(ep: torch.export.ExportedProgram) -> collections.Counter:
    """Count of every op called in the exported graph and its submodules (higher-order op bodies)."""
    counts: collections.Counter = collections.Counter()
    for module in ep.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function":
                    name = str(node.target)
                    if isinstance(node.target, torch._ops.OpOverload):
                        name = f"{node.target.namespace}.{node.target._opname}"
                    counts[name] += 1
    return counts


def _show(counts: collections.Counter, title: str) -> str:
    text = f"{title}: " + ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
    print(text)
    return text


def _fused_ops(counts: collections.Counter) -> dict:
    return {name: n for name, n in counts.items() if name.startswith("resnet_fast.")}


def _assert_folded_in_graph(counts: collections.Counter, ep: torch.export.ExportedProgram, summary: str) -> None:
    """Eval BN is folded into the conv in the graph itself, from the lifted parameters and buffers."""
    assert not [op for op in BN_OPS if counts[op]], f"eval graph still runs BatchNorm ops; {summary}"
    assert counts["aten.rsqrt"] == UNITS, f"expected one BN fold (rsqrt) per unit ({UNITS}); {summary}"
    assert not ep.constants, f"folded weights baked in as constants: {list(ep.constants)}"


# --------------------------------------------------------------------------------------------- torch.export, eval


def test_export_eval_matches_torchvision(eval_case):
    """The plain call, grad enabled: plain aten graph, runs, torchvision's numbers."""
    ep = torch.export.export(eval_case.fast, (eval_case.x,))
    counts = graph_ops(ep)
    summary = _show(counts, "torch.export (eval, grad enabled)")
    assert _fused_ops(counts) == {}, (
        "with grad enabled the units take the differentiable reference path, so no resnet_fast op "
        f"should be traced (ONNX export relies on it); {summary}")
    assert counts["aten.conv2d"] == UNITS, summary
    _assert_folded_in_graph(counts, ep, summary)
    assert set(ep.state_dict) == set(eval_case.fast.state_dict()), "exported state is not the model's state_dict"

    module = ep.module()
    with torch.no_grad():
        assert_tolerance(module(eval_case.x), eval_case.ref64, eval_case.stock, "exported program (no_grad)")
    with torch.inference_mode():
        assert_tolerance(module(eval_case.x), eval_case.ref64, eval_case.stock, "exported program (inference_mode)")
    out = module(eval_case.x)  # grad enabled, as exported
    assert_tolerance(out.detach(), eval_case.ref64, eval_case.stock, "exported program (grad enabled)")


@needs_extension
@pytest.mark.parametrize("algorithm, context", [("onednn", "no_grad"), ("winograd", "no_grad"),
                                                ("winograd", "inference_mode")])
def test_export_eval_without_grad_is_plain_aten(eval_case, monkeypatch, algorithm, context):
    """Under no_grad (or inference_mode) too, the exported graph holds no resnet_fast op, whatever kernel
    eager would run; the program runs and gives torchvision's numbers."""
    monkeypatch.setenv("RESNET_FAST_CPU_CONV3X3", algorithm)
    with getattr(torch, context)():
        ep = torch.export.export(eval_case.fast, (eval_case.x,))
    counts = graph_ops(ep)
    summary = _show(counts, f"torch.export (eval, {context}, {algorithm})")
    assert _fused_ops(counts) == {}, f"resnet_fast ops in an exported program; {summary}"
    assert counts["aten.conv2d"] == UNITS, summary
    assert not [name for name in counts if name.startswith("mkldnn.")], f"oneDNN post-op call traced; {summary}"
    _assert_folded_in_graph(counts, ep, summary)

    module = ep.module()
    with torch.no_grad():
        assert_tolerance(module(eval_case.x), eval_case.ref64, eval_case.stock, f"exported program ({algorithm})")
    with torch.inference_mode():
        assert_tolerance(module(eval_case.x), eval_case.ref64, eval_case.stock,
                         f"exported program ({algorithm}, inference_mode)")


# -------------------------------------------------------------------------------------------- torch.export, train


@pytest.fixture(scope="module")
def train_case() -> SimpleNamespace:
    case = _build(training=True)
    before = {name: t.clone() for name, t in case.fast.state_dict().items()}
    case.ep = torch.export.export(case.fast, (case.x,))
    changed = [name for name, t in case.fast.state_dict().items() if not torch.equal(t, before[name])]
    assert not changed, f"torch.export itself changed the model's state: {changed}"
    case.state_before = before
    return case


@pytest.mark.slow
def test_export_train_updates_running_stats_like_torchvision(train_case):
    counts = graph_ops(train_case.ep)
    summary = _show(counts, "torch.export (train)")
    assert counts["aten.conv2d"] == UNITS, summary
    assert _fused_ops(counts) == {}, f"resnet_fast ops in an exported program; {summary}"

    module = copy.deepcopy(train_case.ep.module())  # its own buffers: the exported program's alias the model's
    for name, t in module.state_dict().items():
        torch.testing.assert_close(t, train_case.state_before[name], rtol=0, atol=0, msg=f"{name} before the call")
    out = module(train_case.x)  # one training step's forward
    assert_tolerance(out.detach(), train_case.ref64, train_case.stock, "exported program (train)")
    ours = module.state_dict()
    ref64, stock = train_case.tv64.state_dict(), train_case.tv32.state_dict()
    stats = [name for name in ref64 if name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 3 * UNITS
    for name in stats:
        if name.endswith("num_batches_tracked"):
            assert ours[name].item() == stock[name].item() == 1, f"{name}: {ours[name].item()} != torchvision's 1"
        else:
            assert_tolerance(ours[name], ref64[name], stock[name], name)


@pytest.mark.slow
def test_export_train_backward_like_torchvision(train_case):
    module = copy.deepcopy(train_case.ep.module())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module(train_case.x).sum().backward()
    ours = dict(module.named_parameters())
    missing = [name for name, p in ours.items() if p.grad is None]
    assert not missing, (f"{len(missing)} of {len(ours)} parameters got no gradient (first: {missing[:3]}); "
                         f"warnings: {sorted({str(w.message)[:120] for w in caught})}")
    tv64, tv32 = copy.deepcopy(train_case.tv).double(), copy.deepcopy(train_case.tv)
    tv64(train_case.x.double()).sum().backward()
    tv32(train_case.x).sum().backward()
    ref64, stock = dict(tv64.named_parameters()), dict(tv32.named_parameters())
    for name in ref64:
        assert_tolerance(ours[name].grad, ref64[name].grad, stock[name].grad, f"{name}.grad")


# ------------------------------------------------------------------------------------------------------------ ONNX


def _import_onnx():
    """onnx and onnxruntime; skips the test, naming the missing package, when any of the three is missing."""
    onnx, _, onnxruntime = [pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[test]')")
                            for name in ONNX_PACKAGES]
    return onnx, onnxruntime


def _onnx_ops(onnx, path) -> collections.Counter:
    model = onnx.load(str(path))
    counts = collections.Counter((node.domain or "ai.onnx", node.op_type) for node in model.graph.node)
    for function in model.functions:
        counts[(function.domain, f"function {function.name}")] += 1
    return counts


def _run_onnxruntime(onnxruntime, path, x: torch.Tensor) -> torch.Tensor:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output)


def _check_onnx(path, case, title: str) -> None:
    onnx, onnxruntime = _import_onnx()
    counts = _onnx_ops(onnx, path)
    summary = "; ".join(f"{domain}::{op} x{n}" for (domain, op), n in sorted(counts.items()))
    print(f"{title}: {summary}")
    assert {domain for domain, _ in counts} == {"ai.onnx"}, f"non-standard ONNX domains or functions: {summary}"
    assert counts[("ai.onnx", "Conv")] == UNITS, summary
    assert not counts[("ai.onnx", "BatchNormalization")], f"BatchNorm not folded: {summary}"
    assert_tolerance(_run_onnxruntime(onnxruntime, path, case.x), case.ref64, case.stock, f"{title} in onnxruntime")


def test_onnx_dynamo_export_runs_in_onnxruntime(eval_case, tmp_path):
    _import_onnx()
    path = tmp_path / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(eval_case.fast, (eval_case.x,), str(path), dynamo=True, verbose=False)
    _check_onnx(path, eval_case, "ONNX (dynamo, grad enabled)")


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_onnx_dynamo_export_without_grad(eval_case, tmp_path, context):
    _import_onnx()
    path = tmp_path / "resnet18.onnx"
    with getattr(torch, context)(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(eval_case.fast, (eval_case.x,), str(path), dynamo=True, verbose=False)
    _check_onnx(path, eval_case, f"ONNX (dynamo, {context})")


@pytest.mark.parametrize("context", ["enable_grad", "no_grad", "inference_mode"])
def test_onnx_torchscript_export_runs_in_onnxruntime(eval_case, tmp_path, context):
    _import_onnx()
    path = tmp_path / "resnet18.onnx"
    with getattr(torch, context)(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
        torch.onnx.export(eval_case.fast, (eval_case.x,), str(path), dynamo=False)
    _check_onnx(path, eval_case, f"ONNX (TorchScript, {context})")
