"""Per-layer choice between the Triton fused conv and the vendor (cuDNN) conv + Triton epilogue.

Each distinct layer (device, dtype, input shape and layout, weight shape,
geometry, residual/ReLU, inference or training) is timed once on CUDA with both
candidates; the faster one is remembered in memory and in
``~/.cache/resnet_fast/triton_select.json`` (``RESNET_FAST_CACHE_DIR`` moves it;
an unwritable cache is ignored). A choice measured once is used in every
context: eager, ``torch.compile`` tracing and CUDA graph capture take the same
kernels. Where a layer was never measured and timing is impossible (CPU, the
interpreter, tracing, capture) the Triton kernel runs, since that is the backend
the caller asked for, and :func:`unmeasured` lists the layer: run the model once
eagerly (or keep the on-disk cache) before compiling or capturing it.

``RESNET_FAST_TRITON_SELECT=triton|vendor`` pins one candidate (tests, benchmarks
of one path); ``measure`` (default) times.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

from resnet_fast import settings
from resnet_fast.ops.triton import _common

MODE_ENV = settings.setting("triton_select").env
CACHE_DIR_ENV = settings.setting("cache_dir").env
DEFAULT_CANDIDATE = "triton"

_winners: dict[str, str] = {}
_timings: dict[str, dict[str, float]] = {}
_unmeasured: set[str] = set()
_disk: Optional[dict[str, str]] = None
_lock = threading.Lock()


def cache_path() -> Path:
    return Path(settings.cache_dir()) / "triton_select.json"


def _version_tag() -> str:
    import triton

    return f"torch {torch.__version__} triton {triton.__version__}"


def _load_disk() -> dict[str, str]:
    global _disk
    if _disk is None:
        _disk = {}
        try:
            saved = json.loads(cache_path().read_text())
            if saved.get("versions") == _version_tag():  # other versions time differently
                _disk = dict(saved.get("winners", {}))
        except (OSError, ValueError, AttributeError):
            pass
    return _disk


def _save_disk() -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"versions": _version_tag(), "winners": _load_disk()}, indent=1))
        temporary.replace(path)
    except OSError:
        pass


def layer_key(kind: str, x: torch.Tensor, weight: torch.Tensor, geometry, has_residual: bool, relu: bool) -> str:
    """Identifies a layer for the choice: everything the speed of either candidate depends on."""
    layout = "nhwc" if _common.memory_format_of(x) == torch.channels_last else "nchw"
    return (f"{kind}|{torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type}|"
            f"{str(x.dtype).replace('torch.', '')}|x{tuple(x.shape)}|{layout}|w{tuple(weight.shape)}|"
            f"s{tuple(geometry.stride)}p{tuple(geometry.padding)}d{tuple(geometry.dilation)}g{geometry.groups}|"
            f"res{int(has_residual)}|relu{int(relu)}|tf32{int(_common.conv_allows_tf32())}")


def _time_ms(fn: Callable[[], object], repeats: int = 3, iterations: int = 10) -> float:
    """Best-of-``repeats`` mean time of ``fn`` in milliseconds (after warm-up, which also autotunes)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / iterations)
    return best


def _remembered(key: str, record_if_unknown: bool) -> str:
    """The winner measured for ``key`` (in this process or on disk), or "" when there is none
    (then listed by :func:`unmeasured` when ``record_if_unknown``)."""
    with _lock:
        winner = _winners.get(key) or _load_disk().get(key)
        if winner:
            _winners[key] = winner
        elif record_if_unknown:
            _unmeasured.add(key)
        return winner or ""


def _timeable_device(device: torch.device) -> bool:
    return device.type == "cuda" and not _common.interpreted()


def _compiling() -> bool:
    return hasattr(torch, "compiler") and torch.compiler.is_compiling()


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


# While torch.compile traces, the look-up (a lock, a file read) runs eagerly and its answer
# becomes a constant of the graph, instead of being traced into.
_remembered_while_tracing = (torch.compiler.assume_constant_result(_remembered)
                             if hasattr(torch, "compiler") and hasattr(torch.compiler, "assume_constant_result")
                             else _remembered)


def choose(key: str, candidates: dict[str, Callable[[], object]], device: torch.device) -> str:
    """The name of the faster candidate for layer ``key`` (measured once, then cached).

    Candidates must be free of side effects (no running-stat updates): they are run
    several times while timing.
    """
    mode = settings.value("triton_select")
    if mode in candidates:
        return mode
    if mode != "measure":
        raise ValueError(f"{MODE_ENV}={mode!r}: this layer's candidates are {', '.join(candidates)}")
    if not _timeable_device(device):
        return DEFAULT_CANDIDATE
    if _compiling():
        winner = _remembered_while_tracing(key, True)
        return winner if winner in candidates else DEFAULT_CANDIDATE
    capturing = _capturing()
    winner = _remembered(key, capturing)
    if winner in candidates:
        return winner
    if capturing:  # timing would synchronise inside the capture
        return DEFAULT_CANDIDATE
    with _lock:
        with torch.no_grad():
            timings = {name: _time_ms(fn) for name, fn in candidates.items()}
        winner = min(timings, key=timings.get)
        _winners[key] = winner
        _timings[key] = timings
        _load_disk()[key] = winner
        _save_disk()
        return winner


def measured() -> dict[str, dict[str, float]]:
    """Timings (ms) of the layers measured in this process, per candidate: for reports and benchmarks."""
    return {key: dict(value) for key, value in _timings.items()}


def unmeasured() -> list[str]:
    """Layers that ran the default candidate because they could not be timed (compile tracing,
    CUDA graph capture) and had no measured winner yet."""
    return sorted(_unmeasured)


def clear(disk: bool = False) -> None:
    """Forget the choices made in this process (and the on-disk cache when ``disk``)."""
    global _disk
    with _lock:
        _winners.clear()
        _timings.clear()
        _unmeasured.clear()
        _disk = None
        if disk:
            try:
                cache_path().unlink()
            except OSError:
                pass
