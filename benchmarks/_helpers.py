"""Helpers of the pytest-benchmark suites (``test_bench_blocks.py``, ``test_bench_models.py``): which device and
backends they run on, GPU-synchronised timed calls, and throughput in ``benchmark.extra_info``.

The runners the suites time come from :mod:`resnet_fast.bench`, which ``resnet-fast bench`` shares.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from resnet_fast import backends

__all__ = ["SUITE_DEVICE_ENV", "suite_device", "available_backends", "synchronized", "record_throughput"]

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
