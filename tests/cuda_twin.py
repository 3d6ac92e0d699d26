"""The CPU twin of the CUDA kernels: csrc/cuda/bn_act_kernels.cu compiled as host C++.

``build(variant)`` compiles the kernel file against ``csrc/cuda/host_shim.h`` (plus the C entry
points of ``tests/cuda_twin_api.cpp``) with g++ into a shared library, cached under
``build/cuda_twin/`` by a hash of the sources, the flags and the compiler. ``Twin`` loads it with
ctypes and calls the real launchers of ``csrc/cuda/bn_act_launchers.h`` on torch tensors.

Variants: ``plain`` (-O2) and ``sanitized`` (AddressSanitizer + UBSan; load it in a process that
has ``libasan.so`` preloaded, see ``sanitized_environment``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "csrc" / "cuda" / "bn_act_kernels.cu", ROOT / "tests" / "cuda_twin_api.cpp"]
HEADERS = [ROOT / "csrc" / "cuda" / name for name in ("host_shim.h", "launch.h", "bn_act_launchers.h")]
HEADERS.append(ROOT / "csrc" / "bn_act.h")
CACHE = ROOT / "build" / "cuda_twin"

COMMON_FLAGS = ["-std=c++17", "-fPIC", "-shared", "-DRESNET_FAST_CUDA_HOST_SHIM", "-Wno-unknown-pragmas"]
VARIANT_FLAGS = {
    "plain": ["-O2"],
    # -O0 -g1: builds in 10 s instead of a minute (the run costs the same: torch dominates it), and
    # line tables are all the reports' stack traces need. Halting on UB makes a report a failure.
    "sanitized": ["-O0", "-g1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                  "-fno-sanitize-recover=undefined"],
}

# DType of bn_act_launchers.h
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# How the element types appear in the kernels' names in the launch log.
CUDA_TYPE_NAMES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16",
                   torch.float64: "double"}

SCHEDULE_ASCENDING, SCHEDULE_DESCENDING, SCHEDULE_SHUFFLED = 0, 1, 2
CUDA_ERROR_INVALID_CONFIGURATION = 9
CUDA_ERROR_LAUNCH_FAILURE = 719


def compiler() -> Optional[str]:
    return shutil.which("g++")


def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


def build(variant: str = "plain") -> Path:
    """Path of the twin library, compiled unless a build of the same sources and flags is cached."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("g++ not found")
    flags = COMMON_FLAGS + VARIANT_FLAGS[variant] + [f"-I{ROOT / 'csrc'}"]
    digest = hashlib.sha256()
    digest.update(_compiler_version(cxx).encode())
    digest.update(" ".join(flags).encode())
    for path in SOURCES + HEADERS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    folder = CACHE / f"{variant}-{digest.hexdigest()[:16]}"
    library = folder / "libcuda_twin.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers build once
        if library.exists():
            return library
        partial = folder / f"libcuda_twin.{os.getpid()}.so"
        command = [cxx, *flags, "-x", "c++", str(SOURCES[0]), "-x", "none", *map(str, SOURCES[1:]), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the CUDA kernels' CPU twin failed:\n$ {' '.join(command)}\n{result.stderr}")
        os.replace(partial, library)
    return library


def asan_runtime() -> Optional[str]:
    """The libasan.so that g++ links against, for LD_PRELOAD, or None."""
    cxx = compiler()
    if cxx is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def sanitized_environment(library: Path) -> dict:
    """Environment of a python that loads the sanitized build. Reports go to stderr: a test runner
    in it must not capture file descriptors (pytest -s), or a report is lost when the sanitizer exits."""
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=asan_runtime() or "",
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:print_summary=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        RESNET_FAST_TWIN_LIBRARY=str(library),
        RESNET_FAST_TWIN_SANITIZED="1",
    )
    return env


@dataclasses.dataclass(frozen=True)
class Shape:
    """ActivationShape of bn_act_launchers.h."""

    batch: int
    channels: int
    spatial: int
    channels_last: bool

    @classmethod
    def of(cls, shape, channels_last: bool) -> "Shape":
        n, c, h, w = shape
        return cls(n, c, h * w, channels_last)

    def args(self):
        return (self.batch, self.channels, self.spatial, int(self.channels_last))


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple
    block: tuple
    stream: int
    error: int


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class Twin:
    """The twin library: the launchers on torch tensors, and the shim's controls and launch log."""

    def __init__(self, library: Path):
        self.path = library
        self.lib = ctypes.CDLL(str(library))
        self._declare()
        self.shared_regions = self._register_shared_arrays()

    def _declare(self):
        vp, i64, i32, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint64
        shape = [i64, i64, i64, i32]
        signatures = {
            "twin_reset": ([], None),
            "twin_set_multiprocessor_count": ([i32], None),
            "twin_set_schedule": ([i32, u64], None),
            "twin_set_shared_regions": ([ctypes.POINTER(u64), ctypes.POINTER(u64), i32], None),
            "twin_get_last_error": ([], i32),
            "twin_last_error_message": ([], ctypes.c_char_p),
            "twin_error_string": ([i32], ctypes.c_char_p),
            "twin_launch_count": ([], i32),
            "twin_launch_kernel": ([i32], ctypes.c_char_p),
            "twin_launch_dims": ([i32, ctypes.POINTER(ctypes.c_uint)], None),
            "twin_launch_stream": ([i32], vp),
            "twin_launch_error": ([i32], i32),
            "twin_bn_act_forward": ([i32, vp, vp, vp, vp, vp, *shape, i32, vp], None),
            "twin_reduction_splits": (shape, i64),
            "twin_batch_stats_workspace_bytes": ([i32, *shape], u64),
            "twin_batch_stats_partials": ([i32, vp, vp, *shape, vp], None),
            "twin_batch_stats_finalize": ([i32, vp, vp, vp, *shape, vp], None),
            "twin_bn_act_backward_workspace_bytes": ([i32, *shape], u64),
            "twin_bn_act_backward_partials": ([i32, vp, vp, vp, vp, vp, vp, *shape, i32, vp], None),
            "twin_bn_act_backward_finalize": ([i32, vp, vp, vp, vp, vp, *shape, vp], None),
            "twin_bn_act_backward_grad_y": ([i32, vp, vp, vp, vp, vp, vp, vp, *shape, i32, vp], None),
            "twin_float_to_half": ([vp, vp, i64], None),
            "twin_half_to_float": ([vp, vp, i64], None),
            "twin_float_to_bfloat16": ([vp, vp, i64], None),
            "twin_bfloat16_to_float": ([vp, vp, i64], None),
            "twin_probe_launch": ([ctypes.c_uint] * 6 + [vp, vp], i32),
            "twin_probe_barrier": ([ctypes.c_uint, i32, vp], i32),
            "twin_probe_threads": ([], i32),
        }
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = argtypes, restype

    def _register_shared_arrays(self) -> int:
        """Hand the shim the addresses of the kernels' __shared__ arrays (function statics of the
        kernels in resnet_fast::cuda's anonymous namespace), so that it poisons them per block."""
        nm = shutil.which("nm")
        if nm is None:
            return 0
        listing = subprocess.run([nm, "-S", "-C", "--defined-only", str(self.path)], capture_output=True, text=True,
                                 check=True).stdout
        anchor, regions = None, []
        for line in listing.splitlines():
            parts = line.split(maxsplit=3)
            if len(parts) != 4:
                continue
            address, size, kind, name = parts
            if name == "twin_anchor":
                anchor = int(address, 16)
            elif (kind in "bBdD" and name.startswith("resnet_fast::cuda::(anonymous namespace)::")
                  and re.search(r"\)::[A-Za-z_]\w*$", name)):
                regions.append((int(address, 16), int(size, 16)))
        if anchor is None:
            return 0
        base = ctypes.cast(self.lib.twin_anchor, ctypes.c_void_p).value - anchor
        addresses = (ctypes.c_uint64 * len(regions))(*[base + a for a, _ in regions])
        sizes = (ctypes.c_uint64 * len(regions))(*[s for _, s in regions])
        self.lib.twin_set_shared_regions(addresses, sizes, len(regions))
        return len(regions)

    # ---- controls

    def reset(self, multiprocessor_count: int = 132, schedule: int = SCHEDULE_ASCENDING, seed: int = 0):
        self.lib.twin_reset()
        self.lib.twin_set_multiprocessor_count(multiprocessor_count)
        self.lib.twin_set_schedule(schedule, seed)

    def set_multiprocessor_count(self, count: int):
        self.lib.twin_set_multiprocessor_count(count)

    def set_schedule(self, schedule: int, seed: int = 0):
        self.lib.twin_set_schedule(schedule, seed)

    def take_error(self) -> tuple[int, str]:
        """cudaGetLastError(), with the shim's description of what went wrong."""
        message = self.lib.twin_last_error_message().decode()
        code = self.lib.twin_get_last_error()
        return code, (f"{self.lib.twin_error_string(code).decode()}: {message}" if code else "")

    def check(self, what: str):
        """What C10_CUDA_KERNEL_LAUNCH_CHECK does after each launcher."""
        code, message = self.take_error()
        assert code == 0, f"{what}: CUDA error {code} ({message})"

    def launches(self) -> list[Launch]:
        out = []
        for i in range(self.lib.twin_launch_count()):
            dims = (ctypes.c_uint * 6)()
            self.lib.twin_launch_dims(i, dims)
            out.append(Launch(self.lib.twin_launch_kernel(i).decode(), tuple(dims[:3]), tuple(dims[3:]),
                              self.lib.twin_launch_stream(i) or 0, self.lib.twin_launch_error(i)))
        return out

    # ---- the launchers

    def reduction_splits(self, shape: Shape) -> int:
        return self.lib.twin_reduction_splits(*shape.args())

    def batch_stats_workspace_bytes(self, dtype: torch.dtype, shape: Shape) -> int:
        return self.lib.twin_batch_stats_workspace_bytes(DTYPES[dtype], *shape.args())

    def bn_act_backward_workspace_bytes(self, dtype: torch.dtype, shape: Shape) -> int:
        return self.lib.twin_bn_act_backward_workspace_bytes(DTYPES[dtype], *shape.args())

    def bn_act_forward(self, dtype, y, scale, shift, residual, out, shape: Shape, relu: bool, stream: int = 0):
        self.lib.twin_bn_act_forward(DTYPES[dtype], _ptr(y), _ptr(scale), _ptr(shift), _ptr(residual), _ptr(out),
                                     *shape.args(), int(relu), stream or None)

    def batch_stats_partials(self, dtype, y, workspace, shape: Shape, stream: int = 0):
        self.lib.twin_batch_stats_partials(DTYPES[dtype], _ptr(y), _ptr(workspace), *shape.args(), stream or None)

    def batch_stats_finalize(self, dtype, workspace, mean, var, shape: Shape, stream: int = 0):
        self.lib.twin_batch_stats_finalize(DTYPES[dtype], _ptr(workspace), _ptr(mean), _ptr(var), *shape.args(),
                                           stream or None)

    def bn_act_backward_partials(self, dtype, grad_out, out, y, mean, grad_residual, workspace, shape: Shape,
                                 relu: bool, stream: int = 0):
        self.lib.twin_bn_act_backward_partials(DTYPES[dtype], _ptr(grad_out), _ptr(out), _ptr(y), _ptr(mean),
                                               _ptr(grad_residual), _ptr(workspace), *shape.args(), int(relu),
                                               stream or None)

    def bn_act_backward_finalize(self, dtype, workspace, invstd, weight, grad_weight, grad_bias, shape: Shape,
                                 stream: int = 0):
        self.lib.twin_bn_act_backward_finalize(DTYPES[dtype], _ptr(workspace), _ptr(invstd), _ptr(weight),
                                               _ptr(grad_weight), _ptr(grad_bias), *shape.args(), stream or None)

    def bn_act_backward_grad_y(self, dtype, grad_out, out, grad_residual, y, mean, workspace, grad_y, shape: Shape,
                               relu: bool, stream: int = 0):
        self.lib.twin_bn_act_backward_grad_y(DTYPES[dtype], _ptr(grad_out), _ptr(out), _ptr(grad_residual), _ptr(y),
                                             _ptr(mean), _ptr(workspace), _ptr(grad_y), *shape.args(), int(relu),
                                             stream or None)

    # ---- the shim itself

    def convert(self, name: str, values: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        values = values.contiguous()
        out = torch.empty(values.shape, dtype=out_dtype)
        getattr(self.lib, f"twin_{name}")(values.data_ptr(), out.data_ptr(), values.numel())
        return out

    def probe_launch(self, grid, block) -> tuple[int, int, int]:
        """(error, threads run, threads that saw coordinates outside the launch)."""
        count, outside = ctypes.c_int64(0), ctypes.c_int64(0)
        error = self.lib.twin_probe_launch(*grid, *block, ctypes.addressof(count), ctypes.addressof(outside))
        return error, count.value, outside.value

    def probe_barrier(self, blocks: int, diverge: bool) -> tuple[int, torch.Tensor]:
        threads = self.lib.twin_probe_threads()
        out = torch.full((blocks, 3, threads), -1.0)
        error = self.lib.twin_probe_barrier(blocks, int(diverge), out.data_ptr())
        return error, out
