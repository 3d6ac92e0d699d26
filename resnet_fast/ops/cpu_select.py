"""Measured choice between CPU kernels that compute the same unit.

Which kernel is fastest for a unit depends on the CPU (AVX2 or AVX-512, cache sizes), the thread
count and the shape, so nothing here guesses from the ISA: each candidate is timed once per
signature (kernel, shapes, geometry, threads) and the time is kept for the process, shared by
every layer and model with that signature. With ``RESNET_FAST_PLAN_CACHE=1`` the times are also
kept on disk (``cpu_timings.json`` in ``RESNET_FAST_CACHE_DIR``), under a tag naming the CPU model,
torch's CPU capability, the threads and the torch and resnet_fast versions, so a new process on the
same machine plans without timing.

Used by the CPU execution plan of a model (``resnet_fast.models.plan``) and by the functional
inference unit (``resnet_fast.ops.extension.conv_bias_act``).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from resnet_fast import settings

WARMUP_RUNS = 1  # the first call packs weights and faults in buffers
TIMED_RUNS = 1  # a plan sums many units, so one run each decides the layout; close calls matter little
MIN_TIMED_SECONDS = 5e-3  # short kernels repeat (best of them) until this much was timed
MAX_TIMED_RUNS = 8

_seconds: dict[str, float] = {}
_disk: Optional[dict[str, float]] = None
_unsaved: dict[str, float] = {}  # measured with the disk cache on, not yet written (see flush)
_lock = threading.RLock()


def signature(kernel: str, x_shape: tuple, weight_shape: tuple, stride: tuple, padding: tuple,
              residual: bool, relu: bool, dtype: torch.dtype = torch.float32) -> str:
    """The key of one kernel's time: everything the time depends on but the weights' values."""
    return (f"{kernel} {str(dtype).replace('torch.', '')} x{tuple(x_shape)} w{tuple(weight_shape)} "
            f"s{tuple(stride)} p{tuple(padding)} r{int(residual)} a{int(relu)} t{torch.get_num_threads()}")


def machine_tag() -> str:
    """What a time on disk is valid for: CPU model, torch's CPU capability, threads, versions."""
    from resnet_fast import _extension
    from resnet_fast._version import __version__

    cpu_isa = _extension.build_info().get("cpu_isa_active", _extension.build_info().get("cpu_isa", "?"))
    return (f"{_cpu_model()} | {torch.backends.cpu.get_cpu_capability()} | kernels {cpu_isa} | "
            f"threads {torch.get_num_threads()} | torch {torch.__version__} | resnet_fast {__version__}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    return Path(settings.cache_dir()) / "cpu_timings.json"


def _disk_times() -> dict[str, float]:
    global _disk
    if _disk is None:
        _disk = {}
        try:
            stored = json.loads(cache_path().read_text())
            _disk = {key: float(seconds) for key, seconds in stored.get(machine_tag(), {}).items()}
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # no cache yet, or unreadable: time again (and rewrite it)
    return _disk


def flush() -> None:
    """Write the times measured since the last flush into the disk cache (one write per plan, not per kernel)."""
    with _lock:
        if _unsaved:
            _save(dict(_unsaved))
            _unsaved.clear()


def _save(new_times: dict[str, float]) -> None:
    """Merge ``new_times`` into the file under this machine's tag; written whole, then renamed."""
    path = cache_path()
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    stored.setdefault(machine_tag(), {}).update(new_times)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(stored, handle, indent=1, sort_keys=True)
        os.replace(handle.name, path)
    except OSError:
        pass  # a read-only cache folder costs a re-timing in the next process, nothing else


def known_seconds(key: str) -> Optional[float]:
    """The time kept for ``key`` (this process, then the disk cache when enabled), or None."""
    with _lock:
        if key in _seconds:
            return _seconds[key]
        if settings.value("plan_cache") == "1" and key in _disk_times():
            _seconds[key] = _disk_times()[key]
            return _seconds[key]
    return None


def seconds(key: str, run: Callable[[], object]) -> float:
    """Seconds per call of ``run`` (best of the timed runs after a warm-up), measured once per ``key``.

    ``run`` must have no side effects beyond its result: it is called several times. With the disk
    cache on, the time reaches the file at the next :func:`flush` (a plan and :func:`fastest` flush).
    """
    known = known_seconds(key)
    if known is not None:
        return known
    with _lock, torch.no_grad():  # one measurement at a time: two at once would slow each other
        if key in _seconds:
            return _seconds[key]
        for _ in range(WARMUP_RUNS):
            run()
        best, spent, runs = float("inf"), 0.0, 0
        while runs < TIMED_RUNS or (spent < MIN_TIMED_SECONDS and runs < MAX_TIMED_RUNS):
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
        _seconds[key] = best
        if settings.value("plan_cache") == "1":
            _disk_times()[key] = best
            _unsaved[key] = best
    return best


def fastest(candidates: dict[str, tuple[str, Callable[[], object]]]) -> tuple[str, dict[str, float]]:
    """The fastest of ``{name: (key, run)}`` and every candidate's seconds."""
    times = {name: seconds(key, run) for name, (key, run) in candidates.items()}
    flush()
    return min(times, key=times.get), times


def forget() -> None:
    """Drop the times kept in this process (the disk cache is left as it is); for tests."""
    global _disk
    with _lock:
        _seconds.clear()
        _unsaved.clear()
        _disk = None


def describe_times(times: dict[str, float], chosen: str) -> str:
    """``"winograd 1.20 ms < onednn 1.90 ms"``: the chosen kernel first, then the others by time."""
    order = [chosen] + sorted((name for name in times if name != chosen), key=times.get)
    return " < ".join(f"{name} {times[name] * 1e3:.2f} ms" for name in order)
