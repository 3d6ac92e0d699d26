"""``resnet-fast bench``: time FastResNet against torchvision eager and its peers.

The default job builds torchvision's ResNet-50 (random init, seeded), a
FastResNet with the same weights, checks that both give the same outputs, builds
every provider, then times them on one batch in interleaved rounds (one call of
each per round, so load changes touch all alike) and prints a table of medians.
Inference of every PyTorch provider (torchvision eager, FastResNet, torch.compile,
TorchScript) runs under ``torch.inference_mode()``, as users run it; training steps
run with autograd::

    provider                      ms/batch  images/s  vs eager  first output  max err
    torchvision eager (NCHW)         ...

Providers: torchvision eager (NCHW and channels_last), FastResNet (the ``auto``
backend, or every available backend with ``--backend all``) and the peers
``torch.compile`` (inductor with freezing), ``torch.jit.freeze`` +
``optimize_for_inference``, ONNX Runtime (CPU provider) and OpenVINO (CPU).

Only light imports live at module level: torchvision, matplotlib, onnx,
onnxruntime and openvino are imported where they are used, so ``resnet-fast
--help`` stays fast. The provider builders (:func:`compiled_runner`,
:func:`jit_runner`, ...) are shared with the pytest-benchmark suites in
``benchmarks/``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from resnet_fast import backends
from resnet_fast.ops.activation_pool import model_scope

# A runner does one unit of work (one batch of inference, or one training step) and returns the output logits.
Runner = Callable[[], Tensor]

PEERS = ("compile", "jit", "onnxruntime", "openvino")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# CPU half precision convolutions are slow emulations on most CPUs, so the CPU accepts fp32 and bf16 only.
DTYPES_BY_DEVICE = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}
# The built-in default job of each device type: ResNet-50 at 224x224.
DEFAULTS = {
    "cpu": dict(model="resnet50", batch_size=8, image_size=224, dtype="float32", iterations=3, warmup=1),
    "cuda": dict(model="resnet50", batch_size=256, image_size=224, dtype="bfloat16", iterations=30, warmup=10),
}


class PeerUnavailable(Exception):
    """A peer cannot run here (not installed, unsupported dtype/device, or its conversion failed)."""


def _command_error(message: str) -> Exception:
    from resnet_fast.cli import CommandError  # cli imports this module: import late to avoid a cycle

    return CommandError(message)


# --------------------------------------------------------------------------------------------------------------------
# Devices, layouts, timing


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer around a call measures the call and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def preferred_memory_format(device: torch.device) -> torch.memory_format:
    """The input/weight layout FastResNet runs fastest in on ``device``.

    channels_last everywhere: cuDNN's tensor-core kernels are NHWC, and on CPU
    oneDNN keeps NHWC activations without a reorder per conv (NCHW inputs are
    reordered to a blocked layout and back around every conv).
    """
    return torch.channels_last


def output_errors(output: Tensor, reference: Tensor) -> tuple[float, float]:
    """``(max |out - ref|, ||out - ref|| / ||ref||)`` in float64; NaN/inf give ``inf``."""
    out = output.detach().to("cpu", torch.float64)
    ref = reference.detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf"), float("inf")
    diff = out - ref
    return float(diff.abs().max()), float(diff.norm() / ref.norm().clamp_min(1e-30))


def image_flops(model_name: str, image_size: int) -> float:
    """Multiply-add count x 2 of one forward pass for ``model_name`` at ``image_size`` (conv + fc), by a meta trace."""
    import torchvision

    model = getattr(torchvision.models, model_name)().to("meta")
    total = 0.0

    def count(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            out_positions = output.shape[2] * output.shape[3]
            total += 2.0 * module.weight.numel() * out_positions
        elif isinstance(module, nn.Linear):
            total += 2.0 * module.weight.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    for handle in handles:
        handle.remove()
    return total


# --------------------------------------------------------------------------------------------------------------------
# Helpers of the pytest-benchmark suites in benchmarks/ (kept here so the suites import them from the package)

SUITE_DEVICE_ENV = "RESNET_FAST_BENCH_DEVICE"


def suite_device() -> torch.device:
    """The device the benchmark suites run on: the GPU when one is visible, unless RESNET_FAST_BENCH_DEVICE says."""
    forced = os.environ.get(SUITE_DEVICE_ENV)
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends(device: torch.device) -> list[str]:
    """The concrete fused backends that can run on ``device`` (``reference`` always can)."""
    return [name for name in backends.BACKENDS if backends.is_available(name, device)]


def synchronized(run: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``run`` followed by a device synchronisation, so a timer covers the GPU work and not only its launch."""
    if device.type != "cuda":
        return run

    def call() -> Any:
        out = run()
        torch.cuda.synchronize(device)
        return out
    return call


def record_throughput(benchmark: Any, device: torch.device, images: Optional[int] = None,
                      flops: Optional[float] = None, **info: Any) -> None:
    """Put ``images_per_s`` / ``tflops`` (of the median round) and ``info`` into a pytest-benchmark's extra_info."""
    benchmark.extra_info.update(info)
    benchmark.extra_info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    stats = getattr(benchmark, "stats", None)  # None when benchmarks are disabled and nothing was timed
    median = getattr(getattr(stats, "stats", stats), "median", None) if stats is not None else None
    if not median:
        return
    if images is not None:
        benchmark.extra_info["images_per_s"] = round(images / median, 3)
    if flops is not None:
        benchmark.extra_info["tflops"] = round(flops / median / 1e12, 5)


# --------------------------------------------------------------------------------------------------------------------
# Runners: each builder returns a zero-argument callable that runs one batch


def eager_eval_runner(model: nn.Module, images: Tensor) -> Runner:
    """Inference under ``torch.inference_mode()`` (what users run) with the model and input as given.

    Every inference provider that runs in PyTorch times its calls through this runner (eager torchvision,
    FastResNet, torch.compile, TorchScript), so their ratios compare like with like. The output is an
    inference tensor: read it (errors, copies), don't feed it to autograd.
    """
    def run() -> Tensor:
        with torch.inference_mode():
            return model(images)
    return run


def train_step_runner(model: nn.Module, images: Tensor, targets: Tensor, lr: float = 0.01) -> Runner:
    """One full training step: forward, cross-entropy, backward, SGD (momentum 0.9) update.

    A FastResNet's step runs inside its activation pool, as in ``resnet-fast train``.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()

    def run() -> Tensor:
        with model_scope(model, images):
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = nn.functional.cross_entropy(logits.float(), targets)
            loss.backward()
            optimizer.step()
        return logits.detach()
    return run


def fast_model(model: nn.Module, backend: Optional[str], memory_format: torch.memory_format) -> nn.Module:
    """FastResNet with ``model``'s weights (a copy), pinned to ``backend`` (None: auto), in ``memory_format``."""
    from resnet_fast.models.resnet import FastResNet

    return FastResNet.from_torchvision(model, backend=backend).to(memory_format=memory_format)


COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


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
    import importlib

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
    import warnings

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
    import warnings

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
    """OpenVINO on the exported ONNX model, CPU plugin, latency hint, ``threads`` inference threads."""
    _check_onnx_peer(images, "openvino")
    if importlib.util.find_spec("openvino") is None:
        raise PeerUnavailable("openvino is not installed (pip install 'resnet-fast[peers]')")
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        _export_onnx(model, images, path)
        compiled = core.compile_model(core.read_model(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",  # no silent bf16/int8 on CPUs that have it: compare like with like
        })
    request = compiled.create_infer_request()
    array = images.contiguous().numpy()

    def run() -> Tensor:
        request.infer({0: array})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
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


# --------------------------------------------------------------------------------------------------------------------
# The comparison


@dataclasses.dataclass
class Provider:
    """One row of the comparison: how to build its runner, and what it measured."""

    key: str                     # stable id, e.g. "fast-extension" (JSON, plots, pytest ids)
    label: str                   # table text
    build: Callable[[], Runner]  # construction (+ first call) of the runner
    kind: str = "stock"          # stock | fast | peer
    ms_per_batch: Optional[float] = None
    ms_min: Optional[float] = None
    images_per_s: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    first_output_s: Optional[float] = None
    max_abs_error: Optional[float] = None
    relative_error: Optional[float] = None
    status: str = "ok"           # ok | skipped | failed
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row.pop("build")
        return row


@dataclasses.dataclass
class BenchConfig:
    """What one ``resnet-fast bench`` run measures."""

    model: str
    batch_size: int
    image_size: int
    dtype: torch.dtype
    device: torch.device
    mode: str                    # eval | train
    backends: list[str]          # FastResNet backends to time ("auto" resolves per device)
    peers: list[str]
    iterations: int
    warmup: int
    fast_memory_format: torch.memory_format
    seed: int = 0
    compile_mode: str = "default"  # torch.compile's mode for the compile peer


def _progress(message: str, end: str = "\n") -> None:
    print(message, end=end, file=sys.stderr, flush=True)


def make_inputs(config: BenchConfig) -> tuple[Tensor, Tensor]:
    """Seeded images (N, 3, S, S) in the config's dtype/device, and class targets for training."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    images = torch.randn(config.batch_size, 3, config.image_size, config.image_size, generator=generator)
    targets = torch.randint(0, 1000, (config.batch_size,), generator=generator)
    return images.to(config.device, config.dtype), targets.to(config.device)


def make_torchvision_model(name: str, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """torchvision's ``name`` with seeded random init and non-trivial BN statistics (so the fold is exercised)."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)()
    with torch.no_grad():  # fresh BN buffers are (0, 1) and affine (1, 0): make eval-mode BN a real affine map
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.to(device=device, dtype=dtype)


def build_providers(config: BenchConfig, base_model: nn.Module, images: Tensor, targets: Tensor) -> list[Provider]:
    """The rows to time, in table order: stock eager, FastResNet per backend, then the peers."""
    train = config.mode == "train"
    channels_last = images.contiguous(memory_format=torch.channels_last)
    fast_images = images.contiguous(memory_format=config.fast_memory_format)
    layout_name = "channels_last" if config.fast_memory_format == torch.channels_last else "NCHW"

    def runner_for(model: nn.Module, x: Tensor) -> Runner:
        return train_step_runner(model, x, targets) if train else eager_eval_runner(model, x)

    def stock(memory_format: torch.memory_format, x: Tensor) -> Callable[[], Runner]:
        def build() -> Runner:
            model = copy.deepcopy(base_model).to(memory_format=memory_format)
            model.train(train)
            return runner_for(model, x)
        return build

    def fast(backend: Optional[str]) -> Callable[[], Runner]:
        def build() -> Runner:
            model = fast_model(copy.deepcopy(base_model).train(train), backend, config.fast_memory_format)
            return runner_for(model, fast_images)
        return build

    def peer(name: str) -> Callable[[], Runner]:
        def build() -> Runner:
            model = copy.deepcopy(base_model)
            return peer_runner(name, model, images, train=train, targets=targets, compile_mode=config.compile_mode)
        return build

    providers = [
        Provider("stock-nchw", "torchvision eager (NCHW)", stock(torch.contiguous_format, images)),
        Provider("stock-channels-last", "torchvision eager (channels_last)", stock(torch.channels_last, channels_last)),
    ]
    for name in config.backends:
        if name == "auto":
            chosen = backends.auto_backend(config.device)
            label = f"FastResNet auto={chosen} ({layout_name})"
            providers.append(Provider("fast-auto", label, fast(None), kind="fast"))
        else:
            providers.append(Provider(f"fast-{name}", f"FastResNet {name} ({layout_name})", fast(name), kind="fast"))
    compile_label = "" if config.compile_mode == "default" else f" {config.compile_mode}"
    peer_labels = {"compile": f"torch.compile{compile_label}" + (" (train)" if train else " (freezing)"),
                   "jit": "torch.jit.freeze + optimize_for_inference",
                   "onnxruntime": f"ONNX Runtime CPU ({torch.get_num_threads()} threads)",
                   "openvino": f"OpenVINO CPU ({torch.get_num_threads()} threads)"}
    for name in config.peers:
        providers.append(Provider(f"peer-{name}", peer_labels[name], peer(name), kind="peer"))
    return providers


def measure(config: BenchConfig, providers: list[Provider], images: Tensor) -> None:
    """Build, check and time every provider in place; failures become rows with a reason, not crashes.

    All providers are built first, then timed in interleaved rounds (one call of each per round), so a
    change in machine load during the run touches every provider alike and the ratios stay comparable.
    """
    reference_output: Optional[Tensor] = None
    runners: dict[str, Runner] = {}
    for provider in providers:
        slow_setup = provider.kind == "peer"
        _progress(f"bench: {provider.label}: " + ("building (may take a while) ..." if slow_setup else "building ..."),
                  end="")
        start = time.perf_counter()
        try:
            synchronize(config.device)
            run = provider.build()
            first = run()  # time to first output: construction (conversion, export, compilation) + first call
            synchronize(config.device)
            provider.first_output_s = time.perf_counter() - start
            # Eval: errors against the first provider's output (torchvision eager NCHW). Train: the first
            # outputs come from identical weights too, but first_step_errors redoes it on fresh copies so the
            # comparison does not depend on which providers ran.
            first = first if config.mode == "eval" else None
            for _ in range(config.warmup):
                run()
            synchronize(config.device)
        except PeerUnavailable as error:
            provider.status, provider.note = "skipped", str(error)
            _progress(f" skipped: {error}")
            continue
        except Exception as error:  # noqa: BLE001 - one broken provider must not lose the others' numbers
            provider.status = "failed"
            provider.note = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            _progress(f" failed: {provider.note}")
            continue
        if first is not None:
            if reference_output is None:
                reference_output = first.detach().clone()
            provider.max_abs_error, provider.relative_error = output_errors(first, reference_output)
        runners[provider.key] = run
        _progress(f" first output after {provider.first_output_s:.1f} s")

    timed = [provider for provider in providers if provider.key in runners]
    seconds: dict[str, list[float]] = {provider.key: [] for provider in timed}
    for round_index in range(config.iterations):
        _progress(f"bench: timing round {round_index + 1}/{config.iterations} of {len(timed)} providers", end="\r")
        for provider in timed:
            start = time.perf_counter()
            runners[provider.key]()
            synchronize(config.device)
            seconds[provider.key].append(time.perf_counter() - start)
    _progress("")
    runners.clear()
    for provider in timed:
        median = statistics.median(seconds[provider.key])
        provider.ms_per_batch = 1e3 * median
        provider.ms_min = 1e3 * min(seconds[provider.key])
        provider.images_per_s = config.batch_size / median
    eager = next((p for p in providers if p.key == "stock-nchw" and p.ms_per_batch), None)
    for provider in providers:
        if eager is not None and provider.ms_per_batch:
            provider.speedup_vs_eager = eager.ms_per_batch / provider.ms_per_batch


def first_step_errors(config: BenchConfig, base_model: nn.Module, images: Tensor, targets: Tensor,
                      providers: list[Provider]) -> None:
    """Train mode: compare FastResNet's first-step logits with torchvision's (same weights, same batch)."""
    reference = copy.deepcopy(base_model).train()(images).detach()
    for provider in providers:
        if provider.kind != "fast" or provider.status != "ok":
            continue
        backend = None if provider.key == "fast-auto" else provider.key.removeprefix("fast-")
        model = fast_model(copy.deepcopy(base_model).train(), backend, config.fast_memory_format)
        output = model(images.contiguous(memory_format=config.fast_memory_format)).detach()
        provider.max_abs_error, provider.relative_error = output_errors(output, reference)


# --------------------------------------------------------------------------------------------------------------------
# Reporting


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: host, CPU, threads, GPU, versions."""
    import torchvision

    from resnet_fast import __version__, _extension

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                             cpu_model)
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "resnet_fast": __version__,
        "extension": _extension.build_info(),
    }


def report(config: BenchConfig, providers: list[Provider], fast_errors: tuple[float, float]) -> dict[str, Any]:
    dtype_name = str(config.dtype).replace("torch.", "")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(config.device),
        "device": str(config.device),
        "device_name": (torch.cuda.get_device_name(config.device) if config.device.type == "cuda"
                        else machine_info(config.device)["cpu"]),
        "torch": torch.__version__,
        "model": config.model,
        "mode": config.mode,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "dtype": dtype_name,
        "fast_memory_format": "channels_last" if config.fast_memory_format == torch.channels_last else "NCHW",
        "iterations": config.iterations,
        "warmup": config.warmup,
        "max_abs_error": fast_errors[0],
        "relative_error": fast_errors[1],
        "results": [p.as_dict() for p in providers],
    }


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(providers: list[Provider]) -> str:
    """The comparison as aligned text, one provider per line; skipped/failed rows say why."""
    width = max(len(p.label) for p in providers) + 2
    header = (f"{'provider':<{width}}{'ms/batch':>10}{'images/s':>10}{'vs eager':>10}{'first out':>11}"
              f"{'max err':>10}")
    lines = [header, "-" * len(header)]
    for p in providers:
        if p.status != "ok":
            lines.append(f"{p.label:<{width}}{p.status}: {p.note}")
            continue
        speedup = "-" if p.speedup_vs_eager is None else f"{p.speedup_vs_eager:.2f}x"
        first = "-" if p.first_output_s is None else f"{p.first_output_s:.1f} s"
        lines.append(f"{p.label:<{width}}{_fmt(p.ms_per_batch, '.1f'):>10}{_fmt(p.images_per_s, '.1f'):>10}"
                     f"{speedup:>10}{first:>11}{_fmt(p.max_abs_error, '.1e'):>10}")
    return "\n".join(lines)


def write_plot(path: str, config: BenchConfig, providers: list[Provider]) -> None:
    """A horizontal bar chart of images/s per provider, labelled with the speed-up vs eager NCHW."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rows = [p for p in providers if p.images_per_s]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    colors = {"stock": "#888888", "fast": "#1f77b4", "peer": "#ff7f0e"}
    ax.barh([p.label for p in rows], [p.images_per_s for p in rows], color=[colors[p.kind] for p in rows])
    for index, p in enumerate(rows):
        ax.text(p.images_per_s, index, f" {p.speedup_vs_eager or 0:.2f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("images/s (higher is better)")
    dtype_name = str(config.dtype).replace("torch.", "")
    ax.set_title(f"{config.model} {config.mode}, batch {config.batch_size}, {config.image_size}px, {dtype_name}, "
                 f"{config.device}")
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``resnet-fast bench``; every default depends on the device, so they are resolved in :func:`run`."""
    parser.add_argument("--model", help="torchvision ResNet name (default: resnet50)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: 8 on CPU, 256 on GPU)")
    parser.add_argument("--image-size", type=int, help="square image side in pixels (default: 224)")
    parser.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval",
                        help="eval: inference on one batch under torch.inference_mode(); "
                             "train: forward + backward + SGD step (default: eval)")
    parser.add_argument("--backend", default="auto",
                        help="FastResNet backend: auto | all (every available one) | reference | extension | triton")
    parser.add_argument("--peers", default="default",
                        help="comma list of compile, jit, onnxruntime, openvino; or none | all | default "
                             "(default: jit, onnxruntime and openvino where installed; compile costs ~40 s "
                             "of compilation on 2 CPU cores, so it is opt-in on CPU)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode of the compile peer (default: default; max-autotune tunes "
                             "every convolution and takes minutes more)")
    parser.add_argument("--memory-format", choices=("auto", "nchw", "channels_last"), default="auto",
                        help="FastResNet's input/weight layout (default: auto = the fastest on the device)")
    parser.add_argument("--iterations", type=int, help="timed rounds; each round calls every provider once, interleaved (default: 3 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, help="untimed iterations before timing (default: 1 CPU, 10 GPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch (default: 0)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (PNG) of images/s")


def _resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise _command_error(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise _command_error(f"--device {name}: resnet_fast runs on cpu and cuda devices")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _command_error(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False"
                                 f"{'; torch is a CPU-only build' if torch.version.cuda is None else ''})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _command_error(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _resolve_backends(value: str, device: torch.device) -> list[str]:
    value = value.strip().lower()
    if value == "all":
        available = [name for name in backends.BACKENDS if backends.is_available(name, device)]
        # "auto" duplicates one of these; list each concrete backend once.
        return available
    if value == "auto":
        return ["auto"]
    names = [part.strip() for part in value.split(",") if part.strip()]
    for name in names:
        if name not in backends.BACKENDS:
            raise _command_error(f"--backend {name!r} is unknown; choose auto, all or "
                                 f"{', '.join(backends.BACKENDS)}")
        reason = backends.unavailable_reason(name, device)
        if reason is not None:
            raise _command_error(f"--backend {name} is not available on {device.type}: {reason}")
    return names


def _resolve_peers(value: str, device: torch.device, mode: str) -> list[str]:
    value = value.strip().lower()
    if value == "none":
        return []
    if value in ("all", "default"):
        found = installed_peers()
        if mode == "train":
            found = ["compile"]
        if value == "default" and device.type == "cpu":
            found = [peer for peer in found if peer != "compile"]  # ~40 s of compilation on 2 cores: opt-in
        if device.type == "cuda":
            found = [peer for peer in found if peer in ("compile", "jit")]  # ONNX peers are CPU-only here
        return found
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise _command_error(f"--peers: unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}, "
                             "or none / all / default")
    return names


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate the options (one-line errors) and fill in the device's defaults."""
    import torchvision

    from resnet_fast.models.resnet import ARCHITECTURES

    device = _resolve_device(args.device)
    defaults = DEFAULTS[device.type]
    model = (args.model or defaults["model"]).strip().lower()
    if model not in ARCHITECTURES or not hasattr(torchvision.models, model):
        raise _command_error(f"--model {model!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    dtype_name = (args.dtype or defaults["dtype"]).strip().lower()
    if dtype_name not in DTYPES:
        raise _command_error(f"--dtype {dtype_name!r} is unknown; choose float32, bfloat16 or float16")
    dtype = DTYPES[dtype_name]
    if dtype not in DTYPES_BY_DEVICE[device.type]:
        allowed = ", ".join(str(d).replace("torch.", "") for d in DTYPES_BY_DEVICE[device.type])
        raise _command_error(f"--dtype {dtype_name} is not supported on {device.type}; choose {allowed}")
    batch_size = defaults["batch_size"] if args.batch_size is None else args.batch_size
    image_size = defaults["image_size"] if args.image_size is None else args.image_size
    iterations = defaults["iterations"] if args.iterations is None else args.iterations
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    if batch_size < 1:
        raise _command_error(f"--batch-size must be at least 1, got {batch_size}")
    if args.mode == "train" and batch_size < 2:
        raise _command_error("--mode train needs --batch-size of at least 2 (BatchNorm batch statistics)")
    if image_size < 32:
        raise _command_error(f"--image-size must be at least 32 (five stride-2 stages), got {image_size}")
    if iterations < 1 or warmup < 0:
        raise _command_error(f"--iterations must be >= 1 and --warmup >= 0, got {iterations} and {warmup}")
    if args.threads is not None:
        if args.threads < 1:
            raise _command_error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    memory_format = {"auto": preferred_memory_format(device), "nchw": torch.contiguous_format,
                     "channels_last": torch.channels_last}[args.memory_format]
    for path_option in ("json", "plot"):
        path = getattr(args, path_option)
        if path and os.path.dirname(os.path.abspath(path)) and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise _command_error(f"--{path_option} {path}: folder {os.path.dirname(os.path.abspath(path))} "
                                 "does not exist")
    return BenchConfig(model=model, batch_size=batch_size, image_size=image_size, dtype=dtype, device=device,
                       mode=args.mode, backends=_resolve_backends(args.backend, device),
                       peers=_resolve_peers(args.peers, device, args.mode), iterations=iterations, warmup=warmup,
                       fast_memory_format=memory_format, seed=args.seed,
                       compile_mode=getattr(args, "compile_mode", "default"))


def run(args: argparse.Namespace) -> int:
    """``resnet-fast bench``: check FastResNet against torchvision, time every provider, print the table."""
    config = config_from_args(args)
    dtype_name = str(config.dtype).replace("torch.", "")
    print(f"{config.model} {config.mode}, batch {config.batch_size}, {config.image_size}x{config.image_size}, "
          f"{dtype_name}, {config.device} ({machine_info(config.device)['gpu'] or machine_info(config.device)['cpu']}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    base_model = make_torchvision_model(config.model, config.seed, config.device, config.dtype)
    images, targets = make_inputs(config)

    # The headline check: FastResNet (auto backend) against torchvision eager, same weights, same batch. Models are
    # built outside any inference context, as users build them; eval forwards run under inference_mode, as timed,
    # train-mode forwards (batch statistics; running stats updated on the copies) under no_grad.
    mode_model = copy.deepcopy(base_model).train(config.mode == "train")
    fast = fast_model(copy.deepcopy(base_model).train(config.mode == "train"), None, config.fast_memory_format)
    with torch.inference_mode() if config.mode == "eval" else torch.no_grad():
        reference = mode_model(images)
        fast_output = fast(images.contiguous(memory_format=config.fast_memory_format))
    fast_errors = output_errors(fast_output, reference)
    del mode_model, fast, fast_output, reference
    print(f"FastResNet ({backends.auto_backend(config.device)}) vs torchvision: max abs error "
          f"{fast_errors[0]:.2e}, relative error {fast_errors[1]:.2e}")

    providers = build_providers(config, base_model, images, targets)
    measure(config, providers, images)
    if config.mode == "train":
        first_step_errors(config, base_model, images, targets, providers)
    print(format_table(providers))
    results = report(config, providers, fast_errors)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, config, providers)
        print(f"wrote {args.plot}")
    if not any(p.status == "ok" for p in providers):
        raise _command_error("no provider could run")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m resnet_fast.bench ...``: the same as ``resnet-fast bench ...``, without the other commands."""
    from resnet_fast.cli import CommandError

    parser = argparse.ArgumentParser(prog="resnet-fast bench", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CommandError, ValueError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"resnet-fast bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
