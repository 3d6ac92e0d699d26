"""Compile every Triton kernel of ``resnet_fast.ops.triton`` for sm_90 (H200) without a GPU.

For each kernel, the arguments are those its host function passes: the host
functions run on ``meta`` tensors with the launcher replaced by a recorder, so
the signature, the constexprs and the specialisations (``tt.divisibility=16``
on pointers and on integers divisible by 16, integers equal to 1 folded into
constants, ``None`` pointers) are exactly what a launch on the GPU would
compile. The conv kernel is compiled for each autotune config (after the
kernel's own ``prune_configs`` for a set of ResNet-50 layers), in bf16, fp16
and fp32, for the flag combinations the host can pass. Each compile goes
through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``;
registers and spills come from the ``ptxas -v`` log of Triton's own ptxas step
(sm_90a), shared memory from the compiled metadata.

A row fails when a config the autotuner may pick (one that survives pruning for
at least one layer) needs more shared memory than an sm_90 block may have
(232448 bytes) or spills more than ``--spill-limit`` bytes per thread, when a
compile fails, or when a ``*_kernel`` has no scenario here. Exit status 1 then.

    python benchmarks/triton_sm90_check.py [--json FILE] [--kernel NAME] [--quick]
        [--configs-from MODULE_OR_FILE:ATTR] [--prune-from MODULE_OR_FILE:ATTR]

``TRITON_INTERPRET=1`` (which tests/conftest.py sets on machines without a GPU)
turns every ``@triton.jit`` function, triton.language's own included, into an
interpreter object that cannot be compiled. The script drops the variable before
importing triton; :func:`run_check` called in a process that imported triton
under it runs the check in a child process without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

if __name__ == "__main__":
    # This script only compiles. Triton reads TRITON_INTERPRET when it decorates jit functions (its own
    # as it is imported), so it goes before anything imports triton.
    os.environ.pop("TRITON_INTERPRET", None)
    # Run from a checkout: the package next to this folder, not an installed copy.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

#: The H200 (sm_90): dynamic shared memory one block may opt into, and the per-SM resources.
SM90_MAX_SHARED_PER_BLOCK = 232448
SM90_SHARED_PER_SM = 233472
SM90_RESERVED_SHARED_PER_BLOCK = 1024
SM90_REGISTERS_PER_SM = 65536
SM90_MAX_WARPS_PER_SM = 64
SM90_MAX_BLOCKS_PER_SM = 32
DEFAULT_SPILL_LIMIT = 64
TARGET_ARCH = 90
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
KERNEL_PACKAGE = "resnet_fast.ops.triton"
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ---------------------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One convolution of a ResNet (square input), batch :data:`BATCH`."""

    name: str
    in_channels: int
    out_channels: int
    size: int
    kernel: int
    stride: int = 1
    padding: int = 0


#: Batch of every workload: a training/inference batch, divisible by 16 like most.
BATCH = 32

#: ResNet-50 (torchvision v1.5: stride on the 3x3) layers, plus ResNet-18's 3x3 convs through the 64..512 ones.
#: Order matters: a config is compiled with the first layer it survives pruning for, so the 3x3 64->64
#: layer (three tap loops, 9 * 64 = 576 reduction, the issue's reference) comes first.
CONV_LAYERS = (
    ConvLayer("layer1.conv2 3x3 64->64 @56", 64, 64, 56, 3, 1, 1),
    ConvLayer("layer2.conv2 3x3 128->128 @28", 128, 128, 28, 3, 1, 1),
    ConvLayer("layer3.conv2 3x3 256->256 @14", 256, 256, 14, 3, 1, 1),
    ConvLayer("layer4.conv2 3x3 512->512 @7", 512, 512, 7, 3, 1, 1),
    ConvLayer("layer1.conv3 1x1 64->256 @56", 64, 256, 56, 1),
    ConvLayer("layer1.conv1 1x1 256->64 @56", 256, 64, 56, 1),
    ConvLayer("layer2.0.conv2 3x3/2 128->128 @56", 128, 128, 56, 3, 2, 1),
    ConvLayer("layer2.0.downsample 1x1/2 256->512 @56", 256, 512, 56, 1, 2),
    ConvLayer("layer4.conv3 1x1 512->2048 @7", 512, 2048, 7, 1),
    ConvLayer("conv1 7x7/2 3->64 @224", 3, 64, 224, 7, 2, 3),
)


@dataclasses.dataclass(frozen=True)
class ConvVariant:
    """Flags the conv host function can pass. ``sweep``: compile every config, not just one."""

    name: str
    bias: bool
    residual: bool
    relu: bool
    stats: bool
    sweep: bool = False


#: Inference: folded BN bias always, residual/ReLU per unit. Training: conv bias None (ResNet convs have none),
#: statistics in the epilogue.
CONV_VARIANTS = (
    ConvVariant("bias+res+relu", bias=True, residual=True, relu=True, stats=False, sweep=True),
    ConvVariant("stats", bias=False, residual=False, relu=False, stats=True, sweep=True),
    ConvVariant("bias+relu", bias=True, residual=False, relu=True, stats=False),
    ConvVariant("bias", bias=True, residual=False, relu=False, stats=False),
    ConvVariant("bias+stats", bias=True, residual=False, relu=False, stats=True),
)


@dataclasses.dataclass(frozen=True)
class ConvPrecision:
    """The conv's input dtype and, for fp32, whether its dots may use TF32."""

    name: str
    dtype: torch.dtype
    tf32: bool = False


#: fp32 convs follow cuDNN's TF32 setting: TF32 dots by default in PyTorch, IEEE ones where it is off
#: (as in the tests). Different tiles fit each, so both are checked.
CONV_PRECISIONS = (
    ConvPrecision("bf16", torch.bfloat16),
    ConvPrecision("fp16", torch.float16),
    ConvPrecision("fp32", torch.float32),
    ConvPrecision("tf32", torch.float32, tf32=True),
)


@dataclasses.dataclass(frozen=True)
class Activation:
    """An (N, C, H, W) tensor of a ResNet-50 stage, in a memory format."""

    channels: int
    size: int
    channels_last: bool

    def __str__(self) -> str:
        return f"{self.channels}@{self.size} {'CL' if self.channels_last else 'NCHW'}"


#: The training conv's output is channels_last (ours) or NCHW (cuDNN on NCHW input): both layouts occur.
ACTIVATIONS = (Activation(256, 56, True), Activation(2048, 7, False))


# ---------------------------------------------------------------------------- capturing launches


@dataclasses.dataclass
class Launch:
    """One kernel launch as a host function issued it (``kernel`` may be an autotuner)."""

    kernel: Any
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for ``_common.launcher``: ``launcher(kernel)[grid](*args, **kwargs)`` records, launches nothing."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []

    def __call__(self, kernel: Any) -> Any:
        recorder = self

        class _Grid:
            def __getitem__(self, grid: Any) -> Callable[..., None]:
                return lambda *args, **kwargs: recorder.launches.append(Launch(kernel, args, kwargs))

        return _Grid()


@contextlib.contextmanager
def _patched(obj: Any, **attributes: Any) -> Iterator[None]:
    """Set the attributes ``obj`` has (host code that lacks one simply does not need it), restore them after."""
    saved = {name: getattr(obj, name) for name in attributes if hasattr(obj, name)}
    try:
        for name in saved:
            setattr(obj, name, attributes[name])
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


@contextlib.contextmanager
def _matmul_tf32(allowed: bool) -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def capture(host_call: Callable[[], Any], tf32: bool = False) -> list[Launch]:
    """The launches ``host_call`` issues, with the host functions taking their GPU branches.

    Host functions size blocks differently under the interpreter, so ``_common.interpreted()`` is
    forced False; the conv's test hook ``FORCED_CONFIG`` is cleared, autotuning switched on and CUDA
    graph capture reported off, so the autotuned path is taken (its record of tuned layers is left as
    it was; the untuned path runs the first config the prune keeps, a subset of it). ``tf32``
    answers the host's TF32 question (cuDNN's setting, or the matmul flag in older host code).
    """
    from resnet_fast.ops.triton import _common, conv

    recorder = _Recorder()
    with _patched(_common, launcher=recorder, interpreted=lambda: False, conv_allows_tf32=lambda: tf32), \
            _patched(conv, FORCED_CONFIG=None, autotune_enabled=lambda: True, _capturing=lambda *_: False,
                     _tuned_layers=set()), \
            _matmul_tf32(tf32):
        host_call()
    return recorder.launches


def _meta(shape: Sequence[int], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def conv_launches(layer: ConvLayer, variant: ConvVariant, precision: ConvPrecision) -> list[Launch]:
    """What ``conv_bias_act_op`` (inference) or ``conv_stats_op`` (training) launch for this layer."""
    from resnet_fast.ops.triton import bn_stats, conv

    dtype = precision.dtype

    def call() -> None:
        # NCHW input: the host converts it to channels_last itself, as for a user's tensor.
        x = _meta((BATCH, layer.in_channels, layer.size, layer.size), dtype)
        weight = _meta((layer.out_channels, layer.in_channels, layer.kernel, layer.kernel), dtype)
        packed = conv.pack_weight(weight, 1)
        out_size = conv.output_size(layer.size, layer.kernel, layer.stride, layer.padding, 1)
        out_shape = (BATCH, layer.out_channels, out_size, out_size)
        bias = _meta((layer.out_channels,), dtype) if variant.bias else None
        residual = _meta(out_shape, dtype, channels_last=True) if variant.residual else None
        stats = None
        if variant.stats:
            # As conv_stats_op sizes it; the finalize launch that follows is covered by the stats scenarios.
            stats = bn_stats.PartialStats(-(-BATCH * out_size * out_size // conv.MIN_BLOCK_M), layer.out_channels,
                                          torch.device("meta"))
        conv.conv_host(x, packed, bias, residual, [layer.stride] * 2, [layer.padding] * 2, [1, 1], variant.relu,
                       stats)

    launches = capture(call, tf32=precision.tf32)
    for launch in launches:
        if dtype == torch.float32 and launch.kwargs.get("DOT_IEEE") == precision.tf32:
            raise RuntimeError(f"conv_host did not follow the TF32 setting of {precision.name}: "
                               "update capture() for the host's new TF32 switch")
    return launches


def elementwise_scenarios() -> list[tuple[str, str, Callable[[], Any]]]:
    """(label, dtype, host call) for the BN and statistics kernels, per dtype and :data:`ACTIVATIONS` entry."""
    from resnet_fast.ops.triton import bn_act, bn_stats, conv

    scenarios = []
    for dtype in DTYPES:
        for act in ACTIVATIONS:
            def tensor(act=act, dtype=dtype):
                return _meta((BATCH, act.channels, act.size, act.size), dtype, act.channels_last)

            def channel(act=act, dtype=torch.float32):
                return _meta((act.channels,), dtype)

            name = DTYPE_NAMES[dtype]
            calls = [
                ("bn_act train res+relu",
                 lambda t=tensor, c=channel: bn_act.bn_act_forward_host(t(), c(), c(), c(), c(), t(), 1e-5, True)),
                ("bn_act train",
                 lambda t=tensor, c=channel: bn_act.bn_act_forward_host(t(), c(), c(), c(), c(), None, 1e-5,
                                                                        False)),
                # The inference epilogue after a vendor conv: folded bias in the activation dtype.
                ("bias_act res+relu",
                 lambda t=tensor, a=act, d=dtype: bn_act.bn_act_forward_host(
                     t(), None, None, None, _meta((a.channels,), d), t(), 0.0, True)),
                ("bn_act backward relu+res",
                 lambda t=tensor, c=channel: bn_act.bn_act_backward_host(t(), t(), t(), c(), c(), c(), 1e-5, True,
                                                                         True)),
                ("bn_act backward",
                 lambda t=tensor, c=channel: bn_act.bn_act_backward_host(t(), t(), t(), c(), c(), None, 1e-5, False,
                                                                         False)),
                ("batch_stats", lambda t=tensor: bn_stats.batch_stats_host(t())),
            ]
            scenarios += [(f"{what} {act}", name, call) for what, call in calls]
    # The training conv's statistics (no shift): conv_stats_op's finalize call, ResNet-50 layer1 size.
    rows = -(-BATCH * 56 * 56 // conv.MIN_BLOCK_M)
    scenarios.append(("finalize after conv 64@56", "fp32",
                      lambda: bn_stats.finalize_stats(bn_stats.PartialStats(rows, 64, torch.device("meta")))))
    return scenarios


# ---------------------------------------------------------------------------- jit functions


def _is_interpreted(obj: Any) -> bool:
    return type(obj).__name__ == "InterpretedFunction" and callable(getattr(obj, "fn", None))


def _is_jit(obj: Any) -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(obj, JITFunction) or _is_interpreted(obj)


def _raw_function(obj: Any) -> types.FunctionType:
    return obj.fn


def interpreted_here() -> bool:
    """True when this process imported triton (or the kernels) under ``TRITON_INTERPRET=1``.

    Then every ``@triton.jit`` function, triton.language's own (``tl.sum``, ``tl.cdiv``, ...) included,
    is an interpreter object that ``triton.compile`` cannot lower, so :func:`run_check` compiles in a
    child process started without ``TRITON_INTERPRET`` instead.
    """
    import triton.language as tl

    return _is_interpreted(tl.standard.sum) or any(_is_interpreted(k) for k in discover_kernels().values())


def kernel_modules() -> list[types.ModuleType]:
    package = importlib.import_module(KERNEL_PACKAGE)
    if getattr(package, "_IMPORT_ERROR", None):
        raise RuntimeError(package._IMPORT_ERROR)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)]


def discover_kernels() -> dict[str, Any]:
    """``name -> jit object`` of every ``*_kernel`` defined in the kernel package (helpers are compiled inline)."""
    found = {}
    for module in kernel_modules():
        for name, value in vars(module).items():
            if _is_jit(value) and name.endswith("_kernel") and _raw_function(value).__module__ == module.__name__:
                found[name] = value
    return found


def _kernel_name(obj: Any) -> str:
    return _raw_function(obj).__name__


def _jit_of(kernel: Any) -> Any:
    """The jit function under an autotuner / heuristics wrapper."""
    while not _is_jit(kernel):
        kernel = kernel.fn
    return kernel


# ---------------------------------------------------------------------------- compile jobs


@dataclasses.dataclass
class Job:
    kernel: str
    scenario: str
    dtype: str
    fn: Any
    bound: dict
    options: dict
    config: str
    layer: str = ""
    survives: str = ""


@dataclasses.dataclass
class Row:
    kernel: str
    scenario: str
    dtype: str
    config: str
    layer: str
    survives: str
    shared: Optional[int] = None
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    blocks_per_sm: Optional[int] = None
    compile_s: float = 0.0
    error: str = ""
    problems: list = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.problems)


def _config_label(config: Any) -> str:
    kw = config.kwargs
    tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw)
    rest = ",".join(f"{k}={v}" for k, v in kw.items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
    label = f"{tile or rest} w{config.num_warps} s{config.num_stages}"
    if getattr(config, "maxnreg", None):
        label += f" r{config.maxnreg}"
    return label + (f" {rest}" if tile and rest else "")


def _config_options(config: Any) -> dict:
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if getattr(config, "num_ctas", 1) != 1:
        options["num_ctas"] = config.num_ctas
    if getattr(config, "maxnreg", None) is not None:
        options["maxnreg"] = config.maxnreg
    return options


def _bind(fn: Any, launch: Launch, extra: Optional[dict] = None) -> tuple[dict, dict]:
    """(argument name -> value, compile options) of a launch."""
    names = _signature_names(fn)
    kwargs = dict(launch.kwargs)
    kwargs.update(extra or {})
    options = {k: kwargs.pop(k) for k in OPTION_KEYS if k in kwargs}
    bound = dict(zip(names, launch.args))
    bound.update(kwargs)
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{_kernel_name(fn)}: no value for {missing}")
    return bound, options


def _signature_names(fn: Any) -> list[str]:
    return list(inspect.signature(_raw_function(fn)).parameters)


class ConfigSource:
    """The conv autotuner's configs and prune function, or replacements (``--configs-from``, ``--prune-from``)."""

    def __init__(self, configs: Optional[list] = None, prune: Optional[Callable] = None) -> None:
        self.configs = configs
        self.prune = prune

    def for_autotuner(self, tuner: Any) -> tuple[list, Optional[Callable]]:
        if not hasattr(tuner, "configs"):
            raise TypeError(f"the conv host launched {tuner!r}, not an autotuner: update capture()")
        configs = self.configs if self.configs is not None else list(tuner.configs)
        prune = self.prune if self.prune is not None else getattr(tuner, "early_config_prune", None)
        return configs, prune


def _surviving(configs: list, prune: Optional[Callable], tuner: Any, launch: Launch) -> list:
    """Configs the autotuner would time for this launch: ``early_config_prune(configs, nargs, **kwargs)``
    called as triton's ``Autotuner.run`` calls it (positional arguments by name, then the launch keywords)."""
    if prune is None or len(configs) <= 1:
        return list(configs)
    nargs = dict(zip(tuner.arg_names, launch.args))
    return list(prune(list(configs), nargs, **launch.kwargs))


def _quick_subset(variant: ConvVariant, precision: ConvPrecision) -> bool:
    """``--quick``: fp16 tiles lower like bf16's and TF32's statistics epilogue like fp32's, so it sweeps
    bf16 and fp32 (both heavy variants) and tf32 (residual + ReLU), and takes the other flags in bf16."""
    if variant.sweep:
        return precision.name in ("bf16", "fp32") or precision.name == "tf32" and variant.residual
    return precision.name == "bf16"


def _selected(precision: ConvPrecision, dtypes: Sequence[str]) -> bool:
    """``--dtype fp32`` selects both fp32 precisions, ``--dtype tf32`` the TF32 one only."""
    return not dtypes or precision.name in dtypes or DTYPE_NAMES[precision.dtype] in dtypes


def conv_jobs(source: ConfigSource, quick: bool = False,
              dtypes: Sequence[str] = ()) -> tuple[list[Job], dict[str, list[str]]]:
    """Per dtype and variant: every config (sweep variants) or the first one the prune keeps (the others),
    each compiled for the first layer of :data:`CONV_LAYERS` it survives pruning for; and, per config that no
    layer keeps (the autotuner never runs it, so it is not compiled), the variants and dtypes where."""
    jobs = []
    never_picked: dict[str, list[str]] = {}
    for variant in CONV_VARIANTS:
        for precision in CONV_PRECISIONS:
            if quick and not _quick_subset(variant, precision) or not _selected(precision, dtypes):
                continue
            per_layer = []
            for layer in CONV_LAYERS:
                (launch,) = conv_launches(layer, variant, precision)
                configs, prune = source.for_autotuner(launch.kernel)
                kept = _surviving(configs, prune, launch.kernel, launch)
                per_layer.append((layer, launch, kept))
            if not variant.sweep:
                # The one the host runs untuned (graph capture, autotuning off): the first the prune keeps.
                configs = [next(kept[0] for _, _, kept in per_layer if kept)]
            for config in configs:
                homes = [entry for entry in per_layer if any(c is config for c in entry[2])]
                if not homes:
                    where = f"{variant.name} {precision.name}"
                    never_picked.setdefault(_config_label(config), []).append(where)
                    continue
                layer, launch, _ = homes[0]
                fn = _jit_of(launch.kernel)
                bound, options = _bind(fn, launch, config.kwargs)
                options = {**options, **_config_options(config)}
                jobs.append(Job(_kernel_name(fn), variant.name, precision.name, fn, bound, options,
                                _config_label(config), layer=layer.name,
                                survives=f"{len(homes)}/{len(per_layer)}"))
    return jobs, never_picked


def elementwise_jobs(quick: bool = False, dtypes: Sequence[str] = ()) -> list[Job]:
    """``quick``: bf16 only (their tiles do not depend on the dtype; fp32 loads are the same code, wider)."""
    jobs = []
    for label, dtype, call in elementwise_scenarios():
        if quick and dtype == "fp16" or quick and dtype == "fp32" and not label.startswith("finalize"):
            continue
        if dtypes and dtype not in dtypes:
            continue
        for launch in capture(call):
            fn = _jit_of(launch.kernel)
            bound, options = _bind(fn, launch)
            blocks = ",".join(f"{k}={v}" for k, v in bound.items() if k.startswith("BLOCK_"))
            config = f"{blocks} w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}"
            jobs.append(Job(_kernel_name(fn), label, dtype, fn, bound, options, config))
    return jobs


def covered_kernels() -> set[str]:
    """Names of the kernels some scenario launches (whatever the filters select to compile)."""
    launches = conv_launches(CONV_LAYERS[0], CONV_VARIANTS[0], CONV_PRECISIONS[0])
    for _, _, call in elementwise_scenarios():
        launches += capture(call)
    return {_kernel_name(_jit_of(launch.kernel)) for launch in launches}


# ---------------------------------------------------------------------------- compiling


def _specialization_impl() -> Optional[Callable]:
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:
        return None
    return native_specialize_impl


_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                  torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
                  torch.bool: "i1"}


def _python_specialization(value: Any, specialize: bool, align: bool) -> tuple[str, Any]:
    """Triton's launch-time rules, for versions without ``native_specialize_impl``."""
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        kind = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        return kind, "D" if specialize and align and value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
        return "*" + _TRITON_DTYPES[value.dtype], "D" if align else ""
    raise TypeError(f"cannot specialise {value!r}")


def ast_source(fn: Any, bound: dict, backend: Any) -> Any:
    """``ASTSource`` with the signature, constexprs and attributes a launch with ``bound`` would use."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import MockTensor

    native = _specialization_impl()
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
            continue
        specialize = not getattr(param, "do_not_specialize", False)
        align = not getattr(param, "do_not_specialize_on_alignment", False)
        if isinstance(value, torch.Tensor):
            # Fresh allocations and the views the hosts pass start at 16-byte-aligned addresses.
            value = MockTensor(value.dtype)
        if native is not None:
            kind, desc = native(backend, value, bool(getattr(param, "is_const", False)), specialize, align)
        else:
            kind, desc = _python_specialization(value, specialize, align)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = desc
        elif isinstance(desc, str):
            attrs[(index,)] = backend.parse_attr(desc)
    return ASTSource(fn, signature, constexprs, attrs)


def find_ptxas() -> Optional[str]:
    """Triton's bundled ptxas (what a launch uses), else the CUDA toolkit's."""
    try:
        from triton.backends.nvidia import compiler as nvidia

        try:
            path = nvidia.get_ptxas(TARGET_ARCH).path
        except TypeError:
            path = nvidia.get_ptxas().path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - any failure here just means "look elsewhere"
        pass
    for candidate in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


_PTXAS_PATTERNS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas_log(log: str) -> dict:
    values = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        found = pattern.search(log)
        if found is None:
            raise RuntimeError(f"ptxas -v printed no {key!r} line:\n{log}")
        values[key] = int(found.group(1))
    return values


@contextlib.contextmanager
def _ptxas_log() -> Iterator[io.StringIO]:
    """Triton's own ``ptxas -v`` log: with ``TRITON_DUMP_PTXAS_LOG=1`` its nvidia backend prints it.

    Reading triton's run, not one of ours, keeps the numbers right across versions: triton 3.8 adds
    ``--regAllocOptLevel=2`` (a ptxas 13 workaround) where 3.6 does not, and they bundle different ptxas.
    """
    saved = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        if saved is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = saved


def ptxas_usage(compiled: Any, log: str, backend: Any, options: dict, ptxas: Optional[str], workdir: str) -> dict:
    """Registers and spills of ``compiled``: from triton's log of this compile; on a cache hit (no log) from
    triton's ptxas step rerun on the PTX; with an explicit ``ptxas``, from ``ptxas -lineinfo -v`` of that one."""
    ptx = compiled.asm["ptx"]
    if ptxas is None and not _PTXAS_PATTERNS["registers"].search(log):
        with _ptxas_log() as rerun:
            backend.make_cubin(ptx, {}, backend.parse_options(dict(options)), TARGET_ARCH)
        log = rerun.getvalue()
    if ptxas is None and _PTXAS_PATTERNS["registers"].search(log):
        return parse_ptxas_log(log)
    # An explicit ptxas, or a triton that prints no log: run one ourselves.
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise FileNotFoundError("no ptxas found")
    source = os.path.join(workdir, "kernel.ptx")
    Path(source).write_text(ptx)
    command = [ptxas, "-lineinfo", "-v", f"--gpu-name=sm_{TARGET_ARCH}a", source, "-o",
               os.path.join(workdir, "kernel.cubin")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed ({done.returncode}): {done.stderr.strip()}")
    return parse_ptxas_log(done.stdout + done.stderr)


def blocks_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM on sm_90 (registers allocated per warp in units of 256)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (SM90_REGISTERS_PER_SM // per_warp) // num_warps if per_warp else SM90_MAX_BLOCKS_PER_SM
    by_shared = SM90_SHARED_PER_SM // (shared + SM90_RESERVED_SHARED_PER_BLOCK)
    return max(0, min(by_registers, by_shared, SM90_MAX_WARPS_PER_SM // num_warps, SM90_MAX_BLOCKS_PER_SM))


def compile_job(job: Job, target: Any, backend: Any, ptxas: Optional[str], workdir: str, spill_limit: int,
                shared_limit: int) -> Row:
    import triton

    row = Row(job.kernel, job.scenario, job.dtype, job.config, job.layer, job.survives)
    start = time.perf_counter()
    try:
        with _ptxas_log() as log:
            compiled = triton.compile(ast_source(job.fn, job.bound, backend), target=target, options=job.options)
        row.shared = int(compiled.metadata.shared)
        usage = ptxas_usage(compiled, log.getvalue(), backend, job.options, ptxas, workdir)
    except Exception as error:  # noqa: BLE001 - reported as a failing row
        row.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        row.problems.append("compile failed")
        row.compile_s = time.perf_counter() - start
        return row
    row.compile_s = time.perf_counter() - start
    row.registers, row.stack = usage["registers"], usage["stack"]
    row.spill_stores, row.spill_loads = usage["spill_stores"], usage["spill_loads"]
    row.blocks_per_sm = blocks_per_sm(row.registers, row.shared, job.options.get("num_warps", 4))
    if row.shared > shared_limit:
        row.problems.append(f"shared {row.shared} > {shared_limit}")
    if max(row.spill_stores, row.spill_loads) > spill_limit:
        row.problems.append(f"spills {row.spill_stores}/{row.spill_loads} B > {spill_limit}")
    return row


@contextlib.contextmanager
def _cache_dir(path: Optional[str]) -> Iterator[None]:
    """A private triton cache by default, so compile times are real and the user's cache stays as it was."""
    saved = os.environ.get("TRITON_CACHE_DIR")
    with contextlib.ExitStack() as stack:
        os.environ["TRITON_CACHE_DIR"] = path or stack.enter_context(tempfile.TemporaryDirectory(prefix="sm90-"))
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved


# ---------------------------------------------------------------------------- the check


@dataclasses.dataclass
class Report:
    rows: list
    uncovered: list
    never_picked: dict
    triton_version: str
    ptxas: str
    spill_limit: int
    shared_limit: int
    seconds: float

    @property
    def failures(self) -> list:
        return [row for row in self.rows if row.failed]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.uncovered

    def describe_failures(self) -> str:
        lines = [f"{r.kernel} {r.scenario} {r.dtype} [{r.config}] @ {r.layer or '-'}: {'; '.join(r.problems)}"
                 f"{' (' + r.error + ')' if r.error else ''}" for r in self.failures]
        lines += [f"{name}: no scenario in benchmarks/triton_sm90_check.py" for name in self.uncovered]
        return "\n".join(lines)

    @classmethod
    def from_json(cls, data: dict) -> "Report":
        rows = [Row(**row) for row in data["rows"]]
        return cls(rows, data["uncovered"], data["never_picked"], data["triton"], data["ptxas"],
                   data["spill_limit"], data["shared_limit"], data["seconds"])

    def to_json(self) -> dict:
        return {"target": f"cuda sm_{TARGET_ARCH}", "triton": self.triton_version, "ptxas": self.ptxas,
                "spill_limit": self.spill_limit, "shared_limit": self.shared_limit, "seconds": self.seconds,
                "ok": self.ok, "uncovered": self.uncovered, "never_picked": self.never_picked,
                "rows": [{k: v for k, v in dataclasses.asdict(r).items()} for r in self.rows]}


def load_attribute(spec: str) -> Any:
    """``package.module:attr`` or ``path/to/file.py:attr``."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"expected MODULE_OR_FILE:ATTR, got {spec!r}")
    if target.endswith(".py") or os.sep in target:
        module_spec = importlib.util.spec_from_file_location(Path(target).stem + "_sm90_proposal", target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, attr)


def run_check(kernels: Sequence[str] = (), configs_from: Optional[str] = None, prune_from: Optional[str] = None,
              quick: bool = False, dtypes: Sequence[str] = (), spill_limit: int = DEFAULT_SPILL_LIMIT,
              shared_limit: int = SM90_MAX_SHARED_PER_BLOCK, ptxas: Optional[str] = None,
              cache_dir: Optional[str] = None, progress: Optional[Callable[[Row], None]] = None) -> Report:
    """Compile the jobs (all kernels, or those whose name contains one of ``kernels``) and judge them.

    ``configs_from`` / ``prune_from`` (``MODULE_OR_FILE:ATTR``) replace the conv autotuner's config list /
    prune function, e.g. with a proposal. ``quick``: a representative subset (see :func:`conv_jobs` and
    :func:`elementwise_jobs`). ``dtypes``: only these ("bf16", "fp16", "fp32", "tf32"). In a process where
    triton runs interpreted, the same check runs in a child process (``progress`` is then not called).
    """
    if interpreted_here():
        return _run_in_child(kernels=kernels, configs_from=configs_from, prune_from=prune_from, quick=quick,
                             dtypes=dtypes, spill_limit=spill_limit, shared_limit=shared_limit, ptxas=ptxas,
                             cache_dir=cache_dir)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    started = time.perf_counter()
    if (ptxas or find_ptxas()) is None:
        raise FileNotFoundError("no ptxas: neither triton's bundled one nor the CUDA toolkit's")
    target = GPUTarget("cuda", TARGET_ARCH, 32)
    backend = make_backend(target)
    discovered = discover_kernels()
    wanted = [name for name in discovered if not kernels or any(k in name for k in kernels)]
    if not wanted:
        raise ValueError(f"no kernel name contains {' or '.join(kernels)}; the kernels: {', '.join(discovered)}")
    source = ConfigSource(load_attribute(configs_from) if configs_from else None,
                          load_attribute(prune_from) if prune_from else None)
    jobs: list[Job] = []
    never_picked: dict[str, list[str]] = {}
    if "conv2d_nhwc_kernel" in wanted:
        conv, never_picked = conv_jobs(source, quick, dtypes)
        jobs += conv
    if any(name != "conv2d_nhwc_kernel" for name in wanted):
        jobs += [job for job in elementwise_jobs(quick, dtypes) if job.kernel in wanted]
    uncovered = sorted(name for name in wanted if name not in covered_kernels())
    rows = []
    with _cache_dir(cache_dir), tempfile.TemporaryDirectory(prefix="sm90-ptxas-") as workdir:
        for job in jobs:
            row = compile_job(job, target, backend, ptxas, workdir, spill_limit, shared_limit)
            rows.append(row)
            if progress is not None:
                progress(row)
    return Report(rows, uncovered, never_picked, triton.__version__, ptxas or f"triton's ({find_ptxas()})",
                  spill_limit, shared_limit, time.perf_counter() - started)


def _run_in_child(kernels: Sequence[str], configs_from: Optional[str], prune_from: Optional[str], quick: bool,
                  dtypes: Sequence[str], spill_limit: int, shared_limit: int, ptxas: Optional[str],
                  cache_dir: Optional[str]) -> Report:
    """:func:`run_check` in a fresh interpreter without ``TRITON_INTERPRET``; the report comes back as JSON."""
    with tempfile.TemporaryDirectory(prefix="sm90-check-") as folder:
        output = os.path.join(folder, "report.json")
        command = [sys.executable, str(Path(__file__).resolve()), "--json", output,
                   "--spill-limit", str(spill_limit), "--shared-limit", str(shared_limit)]
        command += [f"--kernel={name}" for name in kernels] + [f"--dtype={name}" for name in dtypes]
        for flag, value in (("--configs-from", configs_from), ("--prune-from", prune_from), ("--ptxas", ptxas),
                            ("--cache-dir", cache_dir)):
            if value:
                command.append(f"{flag}={value}")
        if quick:
            command.append("--quick")
        environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run(command, env=environment, capture_output=True, text=True)
        if not os.path.exists(output):
            raise RuntimeError(f"the sm_90 check failed to run ({done.returncode}):\n{done.stderr[-4000:]}")
        return Report.from_json(json.loads(Path(output).read_text()))


# ---------------------------------------------------------------------------- output


COLUMNS = ("kernel", "scenario", "dtype", "config", "layer", "kept for", "smem B", "regs", "spill st/ld",
           "CTAs/SM", "s", "status")


def _cells(row: Row) -> list[str]:
    status = "FAIL: " + "; ".join(row.problems) if row.failed else "ok"
    if row.error:
        status += f" ({row.error[:120]})"
    return [row.kernel, row.scenario, row.dtype, row.config, row.layer or "-", row.survives or "-",
            "-" if row.shared is None else str(row.shared), "-" if row.registers is None else str(row.registers),
            "-" if row.spill_stores is None else f"{row.spill_stores}/{row.spill_loads}",
            "-" if row.blocks_per_sm is None else str(row.blocks_per_sm), f"{row.compile_s:.1f}", status]


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in table[1:]]
        return "\n".join(lines)
    widths = [max(len(cells[i]) for cells in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in table)


def format_never_picked(never_picked: dict[str, list[str]]) -> str:
    """One line per set of (variant, dtype) where the same configs are pruned for every layer."""
    groups: dict[tuple, list[str]] = {}
    for config, where in never_picked.items():
        groups.setdefault(tuple(where), []).append(config)
    return "\n".join(f"  {', '.join(where)}: {'; '.join(configs)}" for where, configs in groups.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compile resnet_fast's Triton kernels and autotune configs for sm_90 (H200) without a GPU; "
                    "report shared memory, registers and spills; exit 1 if a config the autotuner may pick "
                    "does not fit or spills.")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--kernel", metavar="NAME", action="append",
                        help="only kernels whose name contains NAME (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="representative subset: conv sweeps in bf16, fp32 and tf32, other flags and the "
                             "element-wise kernels in bf16")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPE_NAMES.values()) + ["tf32"],
                        help="only this dtype (repeatable; fp32 includes the conv's tf32 runs)")
    parser.add_argument("--configs-from", metavar="MODULE_OR_FILE:ATTR",
                        help="conv config list to check instead of the autotuner's (e.g. a proposal)")
    parser.add_argument("--prune-from", metavar="MODULE_OR_FILE:ATTR",
                        help="prune function (triton's early_config_prune signature) to use with --configs-from")
    parser.add_argument("--spill-limit", type=int, default=DEFAULT_SPILL_LIMIT, metavar="BYTES",
                        help=f"largest spill (stores or loads, bytes per thread) that passes (default "
                             f"{DEFAULT_SPILL_LIMIT})")
    parser.add_argument("--shared-limit", type=int, default=SM90_MAX_SHARED_PER_BLOCK, metavar="BYTES",
                        help=f"largest shared memory per block that passes (default {SM90_MAX_SHARED_PER_BLOCK}, "
                             "the H200 opt-in maximum)")
    parser.add_argument("--ptxas", metavar="PATH",
                        help="read registers and spills from this ptxas (-lineinfo -v) instead of the log of "
                             "triton's own ptxas step")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="triton cache to compile into (default: a temporary one, so times are compile times)")
    args = parser.parse_args(argv)

    def progress(row: Row) -> None:
        mark = "FAIL" if row.failed else "ok"
        print(f"[{mark}] {row.kernel} {row.scenario} {row.dtype} {row.config} ({row.compile_s:.1f} s)",
              file=sys.stderr, flush=True)

    try:
        report = run_check(args.kernel or (), args.configs_from, args.prune_from, args.quick, args.dtype or (),
                           args.spill_limit, args.shared_limit, args.ptxas, args.cache_dir, progress)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(format_table(report.rows, args.markdown))
    if report.never_picked:
        print("\nPruned for every layer (never timed, so not compiled):\n"
              + format_never_picked(report.never_picked))
    print(f"\ntriton {report.triton_version}, ptxas {report.ptxas}, target sm_{TARGET_ARCH}a, "
          f"{len(report.rows)} compiles in {report.seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1, default=str))
    if not report.ok:
        print("\nFAILED:\n" + report.describe_failures())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
