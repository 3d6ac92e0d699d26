"""What the bench times: the job (:class:`BenchConfig`), its seeded model and batch, and its rows (:class:`Provider`:
torchvision eager, FastResNet per backend, the peers), built, checked against torchvision and timed by :func:`measure`.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from resnet_fast import backends
from resnet_fast.bench.peers import PeerUnavailable, peer_runner
from resnet_fast.bench.timing import Runner, eager_eval_runner, interleaved_rounds, progress, synchronize, \
    train_step_runner
from resnet_fast.numerics import errors

__all__ = ["DTYPES", "DTYPES_BY_DEVICE", "DEFAULTS", "Provider", "BenchConfig", "preferred_memory_format",
           "fast_model", "make_inputs", "make_torchvision_model", "build_providers", "measure", "first_step_errors"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# CPU half precision convolutions are slow emulations on most CPUs, so the CPU accepts fp32 and bf16 only.
DTYPES_BY_DEVICE = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}
# The built-in default job of each device type: ResNet-50 at 224x224.
DEFAULTS = {
    "cpu": dict(model="resnet50", batch_size=8, image_size=224, dtype="float32", iterations=3, warmup=1),
    "cuda": dict(model="resnet50", batch_size=256, image_size=224, dtype="bfloat16", iterations=30, warmup=10),
}


def preferred_memory_format(device: torch.device) -> torch.memory_format:
    """The input/weight layout FastResNet runs fastest in on ``device``.

    channels_last everywhere: cuDNN's tensor-core kernels are NHWC, and on CPU
    oneDNN keeps NHWC activations without a reorder per conv (NCHW inputs are
    reordered to a blocked layout and back around every conv).
    """
    return torch.channels_last


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


def fast_model(model: nn.Module, backend: Optional[str], memory_format: torch.memory_format) -> nn.Module:
    """FastResNet with ``model``'s weights (a copy), pinned to ``backend`` (None: auto), in ``memory_format``."""
    from resnet_fast.models.resnet import FastResNet

    return FastResNet.from_torchvision(model, backend=backend).to(memory_format=memory_format)


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
    runners = _build_and_check(config, providers)
    timed = [provider for provider in providers if provider.key in runners]
    seconds = interleaved_rounds(runners, config.iterations, config.device)
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


def _build_and_check(config: BenchConfig, providers: list[Provider]) -> dict[str, Runner]:
    """The runner of every provider that builds, by key, after its first call and warm-up; the others are marked
    skipped or failed. Eval: each provider's errors against the first one's output (torchvision eager NCHW)."""
    reference_output: Optional[Tensor] = None
    runners: dict[str, Runner] = {}
    for provider in providers:
        slow_setup = provider.kind == "peer"
        progress(f"bench: {provider.label}: " + ("building (may take a while) ..." if slow_setup else "building ..."),
                 end="")
        start = time.perf_counter()
        try:
            synchronize(config.device)
            run = provider.build()
            first = run()  # time to first output: construction (conversion, export, compilation) + first call
            synchronize(config.device)
            provider.first_output_s = time.perf_counter() - start
            # Train: the first outputs come from identical weights too, but first_step_errors redoes it on fresh
            # copies so the comparison does not depend on which providers ran.
            first = first if config.mode == "eval" else None
            for _ in range(config.warmup):
                run()
            synchronize(config.device)
        except PeerUnavailable as error:
            provider.status, provider.note = "skipped", str(error)
            progress(f" skipped: {error}")
            continue
        except Exception as error:  # noqa: BLE001 - one broken provider must not lose the others' numbers
            provider.status = "failed"
            provider.note = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            progress(f" failed: {provider.note}")
            continue
        if first is not None:
            if reference_output is None:
                reference_output = first.detach().clone()
            provider.max_abs_error, provider.relative_error = errors(first, reference_output)
        runners[provider.key] = run
        progress(f" first output after {provider.first_output_s:.1f} s")
    return runners


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
        provider.max_abs_error, provider.relative_error = errors(output, reference)

