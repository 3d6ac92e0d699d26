"""Backend names, availability (with the reason when unavailable) and selection.

Selection order: an explicit ``backend=`` argument, then the innermost
``with use_backend(...)``, then the ``RESNET_FAST_BACKEND`` environment variable,
then ``auto``. An explicitly requested backend that cannot run raises
:class:`BackendUnavailableError` saying why; ``auto`` falls back quietly.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import re
from typing import Iterator, Optional, Union

import torch

from resnet_fast import _extension, settings
from resnet_fast.errors import BackendUnavailableError

BACKENDS = ("reference", "extension", "triton")
ENV_VAR = settings.setting("backend").env

_context_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("resnet_fast_backend", default=None)


def check_name(name: str) -> str:
    """``name`` if it is a backend name or ``auto``, else a ValueError listing the choices."""
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS + ('auto',))}")
    return name


def _device_type(device: Union[str, torch.device, None]) -> str:
    return torch.device(device if device is not None else "cpu").type


triton_interpreted = settings.triton_interpreted


def unavailable_reason(name: str, device: Union[str, torch.device, None] = "cpu") -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else why it cannot (one sentence)."""
    check_name(name)
    device_type = _device_type(device)
    if device_type not in ("cpu", "cuda"):
        return f"resnet_fast runs on cpu and cuda devices, not {device_type}"
    if name in ("reference", "auto"):
        return None
    if name == "extension":
        error = _extension.load_error()
        if error is not None:
            return error
        if device_type == "cuda" and not _extension.has_cuda_kernels():
            return "resnet_fast._C was built without CUDA kernels (no CUDA toolkit or CPU-only torch at build time)"
        if device_type == "cuda" and torch.cuda.is_available():
            return _gpu_arch_reason(torch.device(device).index)
        return None
    # triton
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device_type == "cpu" and not triton_interpreted():
        return "the triton backend runs on CUDA devices (on CPU only under TRITON_INTERPRET=1)"
    if device_type == "cuda" and triton_interpreted():
        return "TRITON_INTERPRET=1 is set, so Triton kernels run on the CPU only"
    try:
        from resnet_fast.ops import triton as triton_ops
    except Exception as error:  # a broken triton install must not break the other backends
        return f"the triton kernels failed to import: {type(error).__name__}: {error}"
    return triton_ops.unavailable_reason()


_ARCH_ENTRY = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def kernel_image_reason(archs: str, capability: tuple[int, int]) -> Optional[str]:
    """None when CUDA code built for ``archs`` (``TORCH_CUDA_ARCH_LIST`` syntax, e.g. ``"8.0;9.0+PTX"``)
    runs on a GPU of compute ``capability``, else why not.

    A cubin for X.Y runs on X.Y' with Y' >= Y (an ``a`` variant only on X.Y itself); PTX for
    X.Y is compiled by the driver for any newer GPU. An unreadable list is not held against the GPU.
    """
    entries = [entry for entry in re.split(r"[;,\s]+", archs.strip()) if entry]
    parsed = [_ARCH_ENTRY.match(entry) for entry in entries]
    if not entries or not all(parsed):
        return None
    major, minor = capability
    for match in parsed:
        built = (int(match.group(1)), int(match.group(2)))
        exact_only = match.group(3) == "a"
        if built == (major, minor) or (not exact_only and built[0] == major and built[1] <= minor):
            return None
        if match.group(4) and not exact_only and built <= (major, minor):
            return None
    return (f"resnet_fast._C's CUDA kernels were built for {archs}, which cannot run on a compute capability "
            f"{major}.{minor} GPU (rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor})")


_gpu_arch_reasons: dict[int, Optional[str]] = {}


def _gpu_arch_reason(index: Optional[int]) -> Optional[str]:
    index = torch.cuda.current_device() if index is None else index
    if index not in _gpu_arch_reasons:
        archs = str(_extension.build_info().get("cuda_archs", ""))
        _gpu_arch_reasons[index] = kernel_image_reason(archs, torch.cuda.get_device_capability(index))
    return _gpu_arch_reasons[index]


def is_available(name: str, device: Union[str, torch.device, None] = "cpu") -> bool:
    return unavailable_reason(name, device) is None


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for by argument, context or environment (``auto`` when none)."""
    if backend is not None:
        return check_name(backend)
    from_context = _context_backend.get()
    if from_context is not None:
        return from_context
    return settings.value("backend")


def auto_backend(device: Union[str, torch.device, None]) -> str:
    """The backend ``auto`` picks for a device: the compiled kernels where they load, else the reference."""
    if is_available("extension", device):
        return "extension"
    return "reference"


def resolve(backend: Optional[str], device: Union[str, torch.device, None]) -> str:
    """The concrete backend to run on ``device``; raises if an explicit request cannot run there.

    While ``torch.export`` traces, always ``reference``: an exported program (ONNX, AOTInductor,
    another machine) must run where resnet_fast's ops are not installed.
    """
    if _exporting():
        return "reference"
    name = requested_backend(backend)
    if name == "auto":
        return auto_backend(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available on {_device_type(device)}: {reason}")
    return name


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return bool(is_exporting and is_exporting())


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed code with backend ``name`` (``reference``, ``extension``, ``triton`` or ``auto``).

    >>> with resnet_fast.use_backend("reference"):
    ...     out = model(x)
    """
    token = _context_backend.set(check_name(name))
    try:
        yield name
    finally:
        _context_backend.reset(token)


def describe() -> list[dict]:
    """One row per backend and device: availability, reason and whether ``auto`` picks it."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    rows = []
    for device in devices:
        chosen = auto_backend(device)
        for name in BACKENDS:
            reason = unavailable_reason(name, device)
            rows.append({"backend": name, "device": device, "available": reason is None,
                         "reason": reason or "", "auto": name == chosen})
    return rows
