"""Model-level benchmarks: whole ResNets, images/s, every provider side by side.

Groups (one per workload): ``model-eval:resnet50 b8 224 float32``, ``model-train:resnet18 b16 64 float32``.
Eval runs under ``torch.inference_mode()`` for every PyTorch provider (``bench.eager_eval_runner``), as
users run inference; the training step runs with autograd. Providers in each group:

* ``stock-nchw`` / ``stock-channels-last``: torchvision eager.
* ``fast-<backend>``: ``FastResNet.from_torchvision(model, backend=...)`` in its best layout (channels_last).
* ``peer-compile``: ``torch.compile`` (inductor) with ``freezing`` under ``inference_mode``; only for the
  headline workload (ResNet-50 eval, batch 8 on CPU, 256 on GPU) unless ``RESNET_FAST_BENCH_ALL_PEERS=1``:
  one compilation takes ~40 s on 2 CPU cores.
* ``peer-jit``: ``torch.jit.freeze`` + ``optimize_for_inference``.
* ``peer-onnxruntime`` / ``peer-openvino``: on the exported ONNX model (exported under ``no_grad``, an untimed
  build step), CPU, fp32, torch's thread count (when the optional ``peers`` extra is installed).

CPU: fp32, batch 1 and 8 at 224x224; training step of ResNet-18 at batch 16, 64x64.
GPU: bf16 channels_last, batch 1, 64 and 256 at 224x224; training step of ResNet-18 at batch 256.
Each peer is built once per module (``setup_cache``); its build time (construction, export
or compilation, and the first call) is recorded as ``first_output_s``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import pytest
import torch

from resnet_fast import bench
from resnet_fast.numerics import errors

from _helpers import available_backends, record_throughput, suite_device, synchronized  # benchmarks/_helpers.py

DEVICE = suite_device()
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
FAST_MEMORY_FORMAT = bench.preferred_memory_format(DEVICE)
ALL_PEERS = os.environ.get("RESNET_FAST_BENCH_ALL_PEERS", "").strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class Workload:
    model: str
    batch: int
    image_size: int
    train: bool = False

    @property
    def group(self) -> str:
        dtype = str(DTYPE).replace("torch.", "")
        return f"model-{'train' if self.train else 'eval'}:{self.model} b{self.batch} {self.image_size} {dtype}"

    @property
    def id(self) -> str:
        return f"{self.model}-b{self.batch}-{self.image_size}"

    @property
    def slow_peers_here(self) -> bool:
        """Whether torch.compile runs here: on the headline workload (ResNet-50 eval at the largest batch),
        or on every workload with RESNET_FAST_BENCH_ALL_PEERS=1 (each compilation: ~40 s on 2 CPU cores,
        ~30 s on a GPU machine, which has 8 minutes for everything)."""
        return ALL_PEERS or (self.model, self.batch, self.train) == ("resnet50", 256 if ON_GPU else 8, False)

    def rounds(self, first_call_seconds: float) -> tuple[int, int]:
        """(rounds, warmup rounds). GPU: a stable median. CPU: about 3 s of timed calls, 3 to 10 rounds, sized by
        the first call (which the build already made, so slow workloads need no further warmup)."""
        if ON_GPU:
            return 20, 3
        rounds = max(3, min(10, round(3.0 / max(first_call_seconds, 1e-3))))
        return rounds, (1 if first_call_seconds < 1.0 else 0)


if ON_GPU:
    EVAL_WORKLOADS = [Workload(m, b, 224) for m in ("resnet18", "resnet50") for b in (1, 64, 256)]
    TRAIN_WORKLOADS = [Workload("resnet18", 256, 224, train=True)]
else:
    EVAL_WORKLOADS = [Workload(m, b, 224) for m in ("resnet18", "resnet50") for b in (1, 8)]
    TRAIN_WORKLOADS = [Workload("resnet18", 16, 64, train=True)]

FAST_PROVIDERS = [f"fast-{name}" for name in available_backends(DEVICE)]
EVAL_PROVIDERS = (["stock-nchw", "stock-channels-last"] + FAST_PROVIDERS
                  + [pytest.param(f"peer-{name}", marks=pytest.mark.peer) for name in bench.PEERS])
TRAIN_PROVIDERS = (["stock-nchw", "stock-channels-last"] + FAST_PROVIDERS
                   + [pytest.param("peer-compile", marks=pytest.mark.peer)])


def base_model(cache: Any, name: str, train: bool) -> torch.nn.Module:
    """The seeded torchvision model (shared by all providers of a module; each provider copies it)."""
    model = cache.get(("base", name), lambda: bench.make_torchvision_model(name, 0, DEVICE, DTYPE))
    return model.train(train)


def batch_of(cache: Any, workload: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(workload.batch, 3, workload.image_size, workload.image_size, generator=generator)
        targets = torch.randint(0, 1000, (workload.batch,), generator=generator)
        return images.to(DEVICE, DTYPE), targets.to(DEVICE)
    return cache.get(("batch", workload.batch, workload.image_size), make)


def build_runner(provider: str, workload: Workload, model: torch.nn.Module, images: torch.Tensor,
                 targets: torch.Tensor) -> tuple[bench.Runner, torch.Tensor]:
    """Construction + first call of ``provider``'s runner (the time to first output), and that first output."""
    model = copy.deepcopy(model)
    if provider.startswith("peer-"):
        run = bench.peer_runner(provider.removeprefix("peer-"), model, images, train=workload.train, targets=targets)
        return run, run()
    if provider == "stock-nchw":
        x = images
    elif provider == "stock-channels-last":
        model = model.to(memory_format=torch.channels_last)
        x = images.contiguous(memory_format=torch.channels_last)
    else:
        model = bench.fast_model(model, provider.removeprefix("fast-"), FAST_MEMORY_FORMAT)
        x = images.contiguous(memory_format=FAST_MEMORY_FORMAT)
    run = bench.train_step_runner(model, x, targets) if workload.train else bench.eager_eval_runner(model, x)
    return run, run()


def _run_model(benchmark: Any, setup_cache: Any, workload: Workload, provider: str) -> None:
    if provider == "peer-compile" and not workload.slow_peers_here:
        pytest.skip("torch.compile runs on the headline workload only (RESNET_FAST_BENCH_ALL_PEERS=1 for all)")
    if provider == "peer-jit" and ON_GPU and not workload.slow_peers_here:
        pytest.skip("on GPU, TorchScript runs on the headline workload only (RESNET_FAST_BENCH_ALL_PEERS=1 for all)")
    model = base_model(setup_cache, workload.model, workload.train)
    images, targets = batch_of(setup_cache, workload)
    key = (provider, workload)
    try:
        run, first_output = setup_cache.get(key, lambda: build_runner(provider, workload, model, images, targets))
    except bench.PeerUnavailable as error:
        pytest.skip(str(error))
    except Exception as error:  # noqa: BLE001 - a peer that cannot convert this model is reported, not fatal
        if not provider.startswith("peer-"):
            raise
        pytest.skip(f"{provider} failed to build: {type(error).__name__}: {str(error)[:150]}")
    info: dict[str, Any] = {"provider": provider, "first_output_s": round(setup_cache.build_seconds[key], 3),
                            "batch": workload.batch, "image_size": workload.image_size,
                            "dtype": str(DTYPE).replace("torch.", "")}
    if not workload.train:
        # Accuracy against torchvision eager NCHW (same weights, same batch): its first output when it ran
        # first in this group (the usual order), else one extra eager call.
        if provider == "stock-nchw":
            setup_cache.get(("reference", workload), lambda: first_output)
        reference = setup_cache.get(("reference", workload),
                                    lambda: bench.eager_eval_runner(copy.deepcopy(model).eval(), images)())
        info["max_abs_error"], info["relative_error"] = errors(first_output, reference)
    benchmark.group = workload.group
    rounds, warmup = workload.rounds(setup_cache.build_seconds[key])
    benchmark.pedantic(synchronized(run, DEVICE), rounds=rounds, iterations=1, warmup_rounds=warmup)
    record_throughput(benchmark, DEVICE, images=workload.batch, **info)
    setup_cache.pop(key)  # each runner serves one benchmark: free its memory (compiled graphs, sessions)


@pytest.mark.parametrize("provider", EVAL_PROVIDERS)
@pytest.mark.parametrize("workload", EVAL_WORKLOADS, ids=[w.id for w in EVAL_WORKLOADS])
def test_model_eval(benchmark: Any, setup_cache: Any, workload: Workload, provider: str) -> None:
    _run_model(benchmark, setup_cache, workload, provider)


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
@pytest.mark.parametrize("workload", TRAIN_WORKLOADS, ids=[w.id for w in TRAIN_WORKLOADS])
def test_model_train_step(benchmark: Any, setup_cache: Any, workload: Workload, provider: str) -> None:
    _run_model(benchmark, setup_cache, workload, provider)
