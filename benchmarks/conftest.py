"""Shared setup of the pytest-benchmark suites (``python -m pytest benchmarks --benchmark-only``).

The suites run on whatever device is present: CUDA when a GPU is visible (bf16,
channels_last, large batches), else the CPU (fp32, small batches, sized so the
whole run stays under 10 minutes on 2 cores).

Options and environment:

* ``--no-peers`` or ``RESNET_FAST_BENCH_NO_PEERS=1``: skip the peers
  (torch.compile, TorchScript, ONNX Runtime, OpenVINO), whose setup dominates
  the run time on a small CPU.
* ``RESNET_FAST_BENCH_ALL_PEERS=1``: on CPU, also run the slow-to-build peers
  (torch.compile) on every model configuration, not only the headline ones.
* ``RESNET_FAST_BENCH_DEVICE=cpu``: force the CPU even when a GPU is visible.
* ``RESNET_FAST_BENCH_BLOCK_BATCH=N``: batch of the block benchmarks.
* ``RESNET_FAST_BENCH_JSONL=PATH``: append one JSON line per benchmark as soon as
  it finishes (pytest-benchmark's own ``--benchmark-json`` is written only at the
  end of the session, so a run cut short by a time limit would keep nothing).

Every benchmark records ``images_per_s`` (and, for blocks, ``tflops``) in
``benchmark.extra_info``; group names (``block-eval:layer1.conv2 3x3 64@56``,
``model-eval:resnet50 b8 224 float32``) put the providers of one workload side
by side in the pytest-benchmark table.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator

import pytest
import torch

NO_PEERS_ENV = "RESNET_FAST_BENCH_NO_PEERS"
JSONL_ENV = "RESNET_FAST_BENCH_JSONL"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-peers", action="store_true", default=False,
                     help=f"skip torch.compile / jit / ONNX Runtime / OpenVINO benchmarks (or {NO_PEERS_ENV}=1)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "peer: a peer runtime (torch.compile, jit, onnxruntime, openvino)")


def peers_disabled(config: pytest.Config) -> bool:
    flag = os.environ.get(NO_PEERS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return bool(config.getoption("--no-peers")) or flag


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not peers_disabled(config):
        return
    skip = pytest.mark.skip(reason=f"peers disabled (--no-peers or {NO_PEERS_ENV}=1)")
    for item in items:
        if "peer" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    torch.manual_seed(0)
    yield


class SetupCache:
    """Cache of slow-to-build things (base models, compiled models, ONNX sessions), one per test module.

    ``get(key, build)`` builds once and remembers how long it took: for a peer
    that is its time to first output (construction, export or compilation, first call).
    """

    def __init__(self) -> None:
        self._items: dict[Any, Any] = {}
        self.build_seconds: dict[Any, float] = {}

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._items:
            start = time.perf_counter()
            self._items[key] = build()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.build_seconds[key] = time.perf_counter() - start
        return self._items[key]

    def pop(self, key: Any) -> None:
        """Free one entry (a runner used by a single benchmark)."""
        self._items.pop(key, None)


@pytest.fixture(scope="module")
def setup_cache() -> Iterator[SetupCache]:
    cache = SetupCache()
    yield cache
    cache._items.clear()


@pytest.fixture(autouse=True)
def _benchmark_line(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each benchmark, append its statistics (pytest-benchmark's JSON entry) to $RESNET_FAST_BENCH_JSONL."""
    yield
    path = os.environ.get(JSONL_ENV)
    benchmark = request.node.funcargs.get("benchmark")
    stats = getattr(benchmark, "stats", None)
    if not path or stats is None:
        return
    entry = stats.as_dict(include_data=False)
    with open(path, "a") as handle:  # one line per write: a cut-off run leaves whole lines only
        handle.write(json.dumps(entry, default=str) + "\n")
