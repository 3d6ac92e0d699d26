"""The peers FastResNet is compared with: ``torch.compile`` (inductor with freezing), ``torch.jit.freeze`` +
``optimize_for_inference``, ONNX Runtime (CPU provider) and OpenVINO (CPU).

Each builder returns a :data:`~resnet_fast.bench.timing.Runner` (a zero-argument callable that runs one batch),
already called once, or raises :class:`PeerUnavailable` saying why the peer cannot run here. onnx, onnxruntime
and openvino are imported inside the builders, so importing this module stays light.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from resnet_fast.bench.timing import Runner, eager_eval_runner, train_step_runner

__all__ = ["PEERS", "COMPILE_MODES", "PeerUnavailable", "compiled_runner", "jit_runner", "onnxruntime_runner",
           "openvino_runner", "peer_runner", "installed_peers"]

PEERS = ("compile", "jit", "onnxruntime", "openvino")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


class PeerUnavailable(Exception):
    """A peer cannot run here (not installed, unsupported dtype/device, or its conversion failed)."""



def compiled_runner(model: nn.Module, images: Tensor, train: bool = False,
                    targets: Optional[Tensor] = None, mode: str = "default") -> Runner:
    """``torch.compile(model, mode=mode)`` (inductor). Inference compiles with ``freezing`` (weights as
    constants, conv weights pre-packed, BN folded) under ``torch.inference_mode()``; training compiles the
    model and runs :func:`train_step_runner`.

    The first call compiles, so it is made here, inside the config patch (freezing is read at compile time).
    """
    if not hasattr(torch, "compile"):
        raise PeerUnavailable("torch.compile needs torch >= 2.0")
    if images.device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        raise PeerUnavailable("torch.compile on CPU needs a C++ compiler (g++ / c++) on PATH")
    # (``import torch._dynamo`` here would make ``torch`` a local name of this function.)
    dynamo = importlib.import_module("torch._dynamo")
    inductor_config = importlib.import_module("torch._inductor.config")
    dynamo.reset()  # each call of this builder compiles afresh; no recompile limits from earlier models
    if train:
        assert targets is not None
        compiled = torch.compile(model, mode=mode)
        run = train_step_runner(compiled, images, targets)
        run()
        return run
    model.eval()
    compiled = torch.compile(model, mode=mode)
    # Compiled (first call) and timed under inference_mode, like every other provider: in torch 2.14 freezing
    # applies there as under no_grad (the same BN folding and oneDNN weight packing, by inductor's counters).
    with inductor_config.patch(freezing=True):
        run = eager_eval_runner(compiled, images)
        run()
    return run


def jit_runner(model: nn.Module, images: Tensor) -> Runner:
    """``torch.jit.freeze(torch.jit.script(model))`` + ``torch.jit.optimize_for_inference`` (CPU: oneDNN fusion),
    timed under ``torch.inference_mode()`` (the frozen module runs there; scripting/tracing is built outside it)."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices: this peer is measured as it is
        try:
            scripted = torch.jit.script(model)
        except Exception:  # noqa: BLE001 - scripting is not supported for every model; tracing is the fallback
            with torch.no_grad():  # a build step, not timed
                scripted = torch.jit.trace(model, images)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(scripted.eval()))
    run = eager_eval_runner(frozen, images)
    run()  # optimize_for_inference specialises on the first inputs
    return run


def _export_onnx(model: nn.Module, images: Tensor, path: str) -> None:
    """Export ``model`` (eval, fp32, CPU) to ``path``, with the TorchScript exporter where torch still has it."""
    if importlib.util.find_spec("onnx") is None:
        raise PeerUnavailable("onnx is not installed (pip install 'resnet-fast[peers]')")
    model.eval()
    # Kept under no_grad: the export is an untimed build step (both exporters also run under inference_mode in
    # torch 2.14, but nothing is gained by it), and the ONNX Runtime / OpenVINO runners then run outside torch,
    # so torch's grad mode cannot touch their timings.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:  # the TorchScript-based exporter is quick and needs no onnxscript
            torch.onnx.export(model, (images,), path, input_names=["images"], output_names=["logits"],
                              opset_version=17, dynamo=False)
        except TypeError:  # torch < 2.5: no dynamo argument
            torch.onnx.export(model, (images,), path, input_names=["images"], output_names=["logits"],
                              opset_version=17)


def _check_onnx_peer(images: Tensor, name: str) -> None:
    if images.device.type != "cpu":
        raise PeerUnavailable(f"{name} runs on the CPU in this benchmark")
    if images.dtype != torch.float32:
        raise PeerUnavailable(f"{name} is benchmarked in float32 only")


def onnxruntime_runner(model: nn.Module, images: Tensor, threads: Optional[int] = None) -> Runner:
    """ONNX Runtime, CPU execution provider, all graph optimisations, ``threads`` intra-op threads."""
    _check_onnx_peer(images, "onnxruntime")
    if importlib.util.find_spec("onnxruntime") is None:
        raise PeerUnavailable("onnxruntime is not installed (pip install 'resnet-fast[peers]')")
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        _export_onnx(model, images, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.contiguous().numpy()}

    def run() -> Tensor:
        return torch.from_numpy(session.run(None, feed)[0])
    run()
    return run


def openvino_runner(model: nn.Module, images: Tensor, threads: Optional[int] = None) -> Runner:
    """OpenVINO on the exported ONNX model, CPU plugin, latency hint, ``threads`` inference threads.

    bfloat16 images: the float32 graph compiled with ``INFERENCE_PRECISION_HINT=bf16`` (OpenVINO's own
    bf16 path, on CPUs that have AVX512-BF16 or AMX), fed float32 images, its output rounded to bfloat16.
    """
    if images.device.type != "cpu":
        raise PeerUnavailable("openvino runs on the CPU in this benchmark")
    if images.dtype not in (torch.float32, torch.bfloat16):
        raise PeerUnavailable("openvino is benchmarked in float32 and bfloat16 only")
    if importlib.util.find_spec("openvino") is None:
        raise PeerUnavailable("openvino is not installed (pip install 'resnet-fast[peers]')")
    import openvino as ov

    precision = "bf16" if images.dtype == torch.bfloat16 else "f32"
    float_images = images.float()
    float_model = copy.deepcopy(model).float() if images.dtype != torch.float32 else model
    core = ov.Core()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        _export_onnx(float_model, float_images, path)
        compiled = core.compile_model(core.read_model(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
            # Explicit either way: no silent bf16 in a float32 comparison on CPUs that have it.
            "INFERENCE_PRECISION_HINT": precision,
        })
    request = compiled.create_infer_request()
    array = float_images.contiguous().numpy()

    def run() -> Tensor:
        request.infer({0: array})
        return torch.from_numpy(request.get_output_tensor(0).data.copy()).to(images.dtype)
    run()
    return run


def peer_runner(peer: str, model: nn.Module, images: Tensor, train: bool = False,
                targets: Optional[Tensor] = None, compile_mode: str = "default") -> Runner:
    """The runner of peer ``peer`` on a private copy of ``model``; raises :class:`PeerUnavailable` when it can't run."""
    if train and peer != "compile":
        raise PeerUnavailable(f"{peer} is an inference runtime (no training step)")
    if peer == "compile":
        return compiled_runner(model, images, train, targets, mode=compile_mode)
    if peer == "jit":
        return jit_runner(model, images)
    if peer == "onnxruntime":
        return onnxruntime_runner(model, images)
    if peer == "openvino":
        return openvino_runner(model, images)
    raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")


def installed_peers() -> list[str]:
    """Peers whose packages are importable here (compile and jit come with torch)."""
    found = ["compile", "jit"]
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        found.append("onnxruntime")
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("openvino"):
        found.append("openvino")
    return found

