"""Execution plans: which kernel runs each unit of a FastResNet, decided once per input signature.

A plan is built on the first call with a given model structure, input (shape, dtype, device,
memory format), grad mode, train/eval mode, autocast state, backend pins and settings, kept on
the model, and rebuilt when any of those changes. Two kinds:

* **planned trunk** (CPU float32 or bfloat16 inference on the ``extension`` backend, every unit
  folded): each unit's kernel is chosen here, once: oneDNN (conv + bias + add post-ops), the
  Winograd kernel, or, with the residual stages on 8-channel blocks, the blocked Winograd or direct
  kernel (float32; bfloat16 runs oneDNN's bf16 convolutions with fp32 accumulation). Where several can run a unit, each is timed once per shape (``resnet_fast.ops.cpu_select``,
  shared across layers and models) and the fastest runs; the layout of the residual stages is
  the one whose units sum to less. ``RESNET_FAST_CPU_BLOCKED`` / ``RESNET_FAST_CPU_CONV3X3`` force
  a choice. Running the plan decides nothing: it calls the chosen kernels in order.
* **per call** (training, autograd through the model, CUDA, other dtypes, autocast, hooks on a
  skipped module, ``torch.compile``): the units run through :func:`resnet_fast.nn.conv_bn_unit`,
  whose backend chooses by its rules (on CPU training, the conv is measured per shape by
  ``resnet_fast.ops.cpu_conv``).

``FastResNet.explain(x)`` returns the plan with every unit's kernel and why; ``print`` it.
"""

from __future__ import annotations

import copy
import importlib
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from resnet_fast import backends, settings
from resnet_fast.nn.fused import conv_bn_unit, folded_conv, folds, norm_kind
from resnet_fast.ops import conv_output_shape, cpu_select, trace
from resnet_fast.ops.folding import ConvGeometry

CHANNELS_LAST = "channels_last"
BLOCKED = "blocked8"

# Kernel name -> (the layout it reads and writes, its module, the unit function's name there). The
# modules load resnet_fast._C, so they are imported when a plan first needs them, not with the package.
KERNELS: dict[str, tuple[str, str, str]] = {
    "onednn": (CHANNELS_LAST, "resnet_fast.ops.extension", "onednn_unit"),
    "winograd": (CHANNELS_LAST, "resnet_fast.ops.extension", "winograd_unit"),
    "blocked_direct": (BLOCKED, "resnet_fast.ops.blocked", "direct_unit"),
    "blocked_winograd": (BLOCKED, "resnet_fast.ops.blocked", "winograd_unit"),
}


def kernel_function(name: str) -> Callable:
    """The unit function of kernel ``name``, ``(x, folded, residual, relu) -> out``."""
    _, module, function = KERNELS[name]
    return getattr(importlib.import_module(module), function)


def _blocked() -> ModuleType:
    return importlib.import_module("resnet_fast.ops.blocked")
_WINOGRAD_KERNELS = ("winograd", "blocked_winograd")
# bfloat16 has one kernel per unit (oneDNN's); the package's own kernels are float32.
PLANNED_DTYPES = (torch.float32, torch.bfloat16)
_PLANS_KEPT = 8


@dataclass
class Unit:
    """One conv + norm unit of the model, in execution order, and the kernel chosen for it."""

    name: str
    conv: nn.Conv2d
    norm: nn.Module
    relu: bool
    adds_identity: bool
    in_shape: tuple
    out_shape: tuple
    kernel: str = ""
    why: str = ""


@dataclass
class Block:
    """A residual block as the planned trunk runs it: optional downsample, then the main units."""

    downsample: Optional[Unit]
    main: list[Unit]


@dataclass
class ExecutionPlan:
    """The kernels of one model for one input signature; ``str(plan)`` is a table of them."""

    signature: str
    kind: str  # "planned trunk" or "per call"
    why: str  # why this kind; for a planned trunk, how the layout was chosen
    stem: Unit
    blocks: list[Block]
    layout: str = CHANNELS_LAST
    planning_seconds: float = 0.0
    kernels_timed: int = 0
    _explained: bool = field(default=False, repr=False)

    def units(self) -> list[Unit]:
        """Every unit in execution order (stem, then per block the downsample and main units)."""
        order = [self.stem]
        for block in self.blocks:
            order += ([block.downsample] if block.downsample else []) + block.main
        return order

    def rows(self) -> list[dict]:
        """One dict per unit: name, input shape, output shape, kernel, why."""
        return [{"unit": u.name, "input": list(u.in_shape), "output": list(u.out_shape), "kernel": u.kernel,
                 "why": u.why} for u in self.units()]

    def __str__(self) -> str:
        lines = [f"FastResNet execution plan for {self.signature}",
                 f"{self.kind}: {self.why}"]
        if self.kind == "planned trunk":
            lines.append(f"planned in {self.planning_seconds:.2f} s ({self.kernels_timed} kernel timings made, "
                         "the rest reused)")
        width = max(len(u.name) for u in self.units())
        lines.append(f"{'unit':<{width}}  {'input':<20} {'kernel':<18} why")
        for u in self.units():
            shape = "x".join(str(d) for d in u.in_shape)
            lines.append(f"{u.name:<{width}}  {shape:<20} {u.kernel or '-':<18} {u.why}")
        return "\n".join(lines)

    def run(self, model: nn.Module, x: Tensor) -> Tensor:
        """The trunk up to ``layer4`` on ``x``: the chosen kernels in order (planned trunk), or the
        units through ``conv_bn_unit`` (per call)."""
        if self.kind != "planned trunk":
            return per_call_features(model, x)
        x = _run_unit(self.stem, x, None)
        if self.layout == BLOCKED:
            x = _blocked().max_pool_to_blocked(x, model.maxpool)
        else:
            x = model.maxpool(x)
        for block in self.blocks:
            identity = x if block.downsample is None else _run_unit(block.downsample, x, None)
            out = x
            for unit in block.main:
                out = _run_unit(unit, out, identity if unit.adds_identity else None)
            x = out
        return _blocked().from_blocked(x) if self.layout == BLOCKED else x


def _run_unit(unit: Unit, x: Tensor, residual: Optional[Tensor]) -> Tensor:
    folded = folded_conv(unit.conv, unit.norm, x.dtype)
    if unit.kernel == "blocked_direct":
        # The trunk owns every block input it passes as a residual: the result may overwrite it.
        return _blocked().direct_unit(x, folded, residual, unit.relu, overwrite_residual=True)
    return kernel_function(unit.kernel)(x, folded, residual, unit.relu)


def per_call_features(model: nn.Module, x: Tensor) -> Tensor:
    """The trunk through ``conv_bn_unit`` and the stage modules: each backend chooses per call."""
    x = conv_bn_unit(x, model.conv1, model.bn1, relu=True, backend=model.backend)
    x = model.maxpool(x)
    x = model.layer1(x)
    x = model.layer2(x)
    x = model.layer3(x)
    return model.layer4(x)


# ------------------------------------------------------------------------------------------
# The plan cache kept on the model

class PlanCache:
    """A model's plans by key. Copies and pickles of the model start empty (plans hold modules)."""

    def __init__(self) -> None:
        self.plans: dict[tuple, ExecutionPlan] = {}
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> "PlanCache":
        return PlanCache()

    def __reduce__(self) -> tuple:
        return PlanCache, ()


def plan_cache(model: nn.Module) -> PlanCache:
    cache = model.__dict__.get("_resnet_fast_plans")
    if cache is None:
        cache = model.__dict__["_resnet_fast_plans"] = PlanCache()
    return cache


def plan_for(model: nn.Module, x: Tensor) -> ExecutionPlan:
    """The model's plan for ``x`` in the current context: kept, or built now (timing kernels once)."""
    key = _plan_key(model, x)
    cache = plan_cache(model)
    plan = cache.plans.get(key)
    if plan is None:
        with cache.lock:  # two threads on a new signature: one builds, the other reuses
            plan = cache.plans.get(key)
            if plan is None:
                plan = build_plan(model, x)
                if len(cache.plans) >= _PLANS_KEPT:
                    cache.plans.pop(next(iter(cache.plans)))
                cache.plans[key] = plan
    return plan


def _plan_key(model: nn.Module, x: Tensor) -> tuple:
    """Everything a plan depends on; the weights' values are not in it (the fold cache sees those)."""
    structure = [id(model.maxpool), type(model.maxpool), _has_hooks(model.maxpool)]
    for name, layer in _stages(model):
        structure += [id(layer), _has_hooks(layer)]
        for block in layer:
            structure += [id(block), type(block), getattr(block, "backend", None), _has_hooks(block)]
    for unit in _unit_modules(model):
        conv, norm = unit[1], unit[2]
        weight = getattr(conv, "weight", None)
        structure += [id(conv), id(norm), type(norm), norm.training, id(weight),
                      None if weight is None else (weight.dtype, weight.device, tuple(weight.shape),
                                                   weight.requires_grad)]
    return (tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last),
            torch.is_grad_enabled(), x.requires_grad, model.training, model.backend,
            torch.is_autocast_enabled("cpu"), _global_hooks(), torch.get_num_threads(),
            backends.requested_backend(), settings.snapshot(("cpu_blocked", "cpu_conv3x3", "cpu_conv")),
            tuple(structure))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, getattr(model, name)) for name in ("layer1", "layer2", "layer3", "layer4")]


def _block_specs(block: nn.Module, prefix: str) -> tuple[Optional[tuple], list[tuple]]:
    """(name, conv, norm, relu, adds_identity) of a block's downsample (or None) and of its main units."""
    downsample = None
    if getattr(block, "downsample", None) is not None:
        downsample = (prefix + "downsample.0", block.downsample[0], block.downsample[1], False, False)
    names = [name for name in ("conv1", "conv2", "conv3") if hasattr(block, name)]
    main = [(prefix + name, getattr(block, name), getattr(block, "bn" + name[-1]), True, position == len(names) - 1)
            for position, name in enumerate(names)]
    return downsample, main


def _unit_modules(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module, bool, bool]]:
    """(name, conv, norm, relu, adds_identity) of every unit in execution order."""
    units = [("conv1", model.conv1, model.bn1, True, False)]
    for stage, layer in _stages(model):
        for index, block in enumerate(layer):
            downsample, main = _block_specs(block, f"{stage}.{index}.")
            units += ([downsample] if downsample else []) + main
    return units


# ------------------------------------------------------------------------------------------
# Building a plan

def _signature(model: nn.Module, x: Tensor) -> str:
    layout = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else "contiguous"
    grad = "grad on" if torch.is_grad_enabled() else "grad off"
    autocast = ", autocast " + str(torch.get_autocast_dtype("cpu")).replace("torch.", "") \
        if torch.is_autocast_enabled("cpu") else ""
    return (f"{x.device.type} {str(x.dtype).replace('torch.', '')} {tuple(x.shape)} {layout}, "
            f"{'train' if model.training else 'eval'}, {grad}{autocast}, {torch.get_num_threads()} threads")


def _trunk_blocker(model: nn.Module, x: Tensor) -> Optional[str]:
    """None when the planned trunk gives what calling the modules gives; else why it cannot run."""
    if not (x.device.type == "cpu" and x.dtype in PLANNED_DTYPES):
        return f"{x.device.type} {str(x.dtype).replace('torch.', '')}: kernels chosen per call by the backend"
    if x.shape[0] == 0:
        return "an empty batch"
    if torch.is_autocast_enabled("cpu"):
        return "autocast: the units run in its dtype, chosen per call"
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters())):
        return "autograd needs gradients through the units"
    if _global_hooks():
        return "global forward hooks would miss the modules the trunk skips"
    if _has_hooks(model.maxpool) or type(model.maxpool) not in (nn.MaxPool2d, nn.Identity):
        return "the max-pool is hooked or not a stock nn.MaxPool2d"
    for name, layer in _stages(model):
        if not isinstance(layer, nn.Sequential) or _has_hooks(layer):
            return f"{name} is hooked or not an nn.Sequential"
        for index, block in enumerate(layer):
            if type(block).__name__ not in ("BasicBlock", "Bottleneck") or _has_hooks(block):
                return f"{name}.{index} is hooked or not a stock block"
            if backends.resolve(block.backend, x.device) != "extension":
                return f"{name}.{index} runs on the {backends.resolve(block.backend, x.device)} backend"
    if backends.resolve(model.backend, x.device) != "extension":
        return f"the stem runs on the {backends.resolve(model.backend, x.device)} backend"
    if not _blocked().available():
        return "the extension lacks the CPU inference kernels"
    for name, conv, norm, _, _ in _unit_modules(model):
        if not isinstance(conv, nn.Conv2d) or norm_kind(norm) == "unfused" or not folds(norm):
            return f"{name}'s norm layer is not folded in this mode"
        if conv.weight.dtype != x.dtype or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return f"{name} is not a zero-padded convolution of the input's dtype"
    return None


def _blocked_blocker(model: nn.Module, units: list[tuple]) -> Optional[str]:
    """None when the residual stages can run on 8-channel blocks; else why not."""
    maxpool = model.maxpool
    if type(maxpool) is nn.MaxPool2d and (maxpool.ceil_mode or maxpool.return_indices):
        return "the max-pool uses ceil_mode or return_indices"
    for name, conv, *_ in units[1:]:
        if not _blocked().conv_supported(conv):
            return f"{name} has no blocked kernel (groups, dilation, kernel size or channels not in blocks of 8)"
    return None


def _geometry(conv: nn.Conv2d) -> ConvGeometry:
    return ConvGeometry(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def _shaped_units(model: nn.Module, x: Tensor) -> Optional[tuple[Unit, list[Block]]]:
    """The stem and blocks with every unit's input and output shape, or None if the shapes do not chain
    (the modules then raise their own error when called)."""

    def shaped(spec: tuple, in_shape: tuple) -> Optional[Unit]:
        name, conv, norm, relu, adds_identity = spec
        if not isinstance(conv, nn.Conv2d) or in_shape[1] != conv.in_channels:
            return None
        out_shape = tuple(conv_output_shape(torch.empty(in_shape, device="meta"), conv.weight, _geometry(conv)))
        return Unit(name, conv, norm, relu, adds_identity, in_shape, out_shape) if min(out_shape[2:]) >= 1 else None

    try:
        stem = shaped(("conv1", model.conv1, model.bn1, True, False), tuple(x.shape))
        if stem is None:
            return None
        shape = tuple(model.maxpool(torch.empty(stem.out_shape, device="meta")).shape)
        blocks = []
        for stage, layer in _stages(model):
            for index, block in enumerate(layer):
                downsample_spec, main_specs = _block_specs(block, f"{stage}.{index}.")
                downsample = None if downsample_spec is None else shaped(downsample_spec, shape)
                if downsample_spec is not None and downsample is None:
                    return None
                main, unit_shape = [], shape
                for spec in main_specs:
                    unit = shaped(spec, unit_shape)
                    if unit is None:
                        return None
                    main.append(unit)
                    unit_shape = unit.out_shape
                if not main or unit_shape != (downsample.out_shape if downsample else shape):
                    return None
                blocks.append(Block(downsample, main))
                shape = unit_shape
    except (AttributeError, TypeError, RuntimeError, IndexError):
        return None
    return stem, blocks


def build_plan(model: nn.Module, x: Tensor) -> ExecutionPlan:
    """A new plan for ``x`` in the current context (timing the kernels not timed before)."""
    signature = _signature(model, x)
    shaped = _shaped_units(model, x)
    if shaped is None:  # the modules raise their own error when called
        blocker: Optional[str] = "the modules' shapes do not chain for this input"
    else:
        blocker = _trunk_blocker(model, x)
    if blocker is not None or torch.compiler.is_compiling():
        stem, blocks = shaped if shaped is not None else (Unit("conv1", model.conv1, model.bn1, True, False,
                                                                   tuple(x.shape), ()), [])
        return ExecutionPlan(signature, "per call", blocker or "torch.compile traces the modules", stem, blocks)
    start = time.perf_counter()
    stem, blocks = shaped
    timed_before = len(cpu_select._seconds)
    layout, why = _choose_kernels(model, stem, blocks, _Timing(x.dtype))
    cpu_select.flush()
    return ExecutionPlan(signature, "planned trunk", why, stem, blocks, layout,
                         planning_seconds=time.perf_counter() - start,
                         kernels_timed=len(cpu_select._seconds) - timed_before)


@dataclass
class _Timing:
    """What the timing of one plan shares: the dtype, and random inputs made once per shape."""

    dtype: torch.dtype
    inputs: dict = field(default_factory=dict)

    def unit_inputs(self, unit: Unit, layout: str) -> tuple[Tensor, Optional[Tensor]]:
        key = (unit.in_shape, unit.out_shape if unit.adds_identity else None, layout)
        if key not in self.inputs:
            generator = torch.Generator().manual_seed(0)  # a private generator: the global RNG is the user's
            x = torch.randn(unit.in_shape, generator=generator).to(self.dtype)
            residual = torch.randn(unit.out_shape, generator=generator).to(self.dtype) if unit.adds_identity \
                else None
            if layout == BLOCKED:
                x = _blocked().to_blocked(x)
                residual = None if residual is None else _blocked().to_blocked(residual)
            else:
                x = x.contiguous(memory_format=torch.channels_last)
                residual = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
            self.inputs[key] = (x, residual)
        return self.inputs[key]


def _candidates(unit: Unit, layout: str, dtype: torch.dtype) -> tuple[list[str], str]:
    """The kernels that may run ``unit`` in ``layout`` under the settings, and the rule if only one may."""
    if dtype != torch.float32:
        return ["onednn"], f"the only {str(dtype).replace('torch.', '')} kernel"
    winograd = _blocked().winograd_shape(unit.conv)
    forced = settings.value("cpu_conv3x3")
    if layout == CHANNELS_LAST:
        kernels = ["onednn"] + (["winograd"] if winograd else [])
    else:
        kernels = ["blocked_direct"] + (["blocked_winograd"] if winograd else [])
    if winograd and forced == "winograd":
        return [k for k in kernels if k in _WINOGRAD_KERNELS], "RESNET_FAST_CPU_CONV3X3=winograd"
    if winograd and forced == "onednn":
        return [k for k in kernels if k not in _WINOGRAD_KERNELS], "RESNET_FAST_CPU_CONV3X3=onednn"
    rule = f"only kernel in {layout}" if len(kernels) == 1 else ""
    return kernels, rule


def _unit_times(unit: Unit, layout: str, kernels: list[str], timing: _Timing) -> dict[str, float]:
    folded = folded_conv(unit.conv, unit.norm, timing.dtype)
    x, residual = timing.unit_inputs(unit, layout)
    g = folded.geometry
    times = {}
    for kernel in kernels:
        key = cpu_select.signature(kernel, unit.in_shape, folded.weight.shape, g.stride, g.padding,
                                   residual is not None, unit.relu, timing.dtype)
        run = kernel_function(kernel)
        times[kernel] = cpu_select.seconds(key, lambda run=run: run(x, folded, residual, unit.relu))
    return times


def _layouts(model: nn.Module, dtype: torch.dtype) -> tuple[list[str], str]:
    """The layouts the residual stages may run in, and the rule when only one may."""
    if dtype != torch.float32:
        return [CHANNELS_LAST], f"{str(dtype).replace('torch.', '')}: the blocked kernels are float32"
    forced = settings.value("cpu_blocked")
    blocked_reason = _blocked_blocker(model, _unit_modules(model))
    if forced == "1" and blocked_reason is not None:
        return [CHANNELS_LAST], f"RESNET_FAST_CPU_BLOCKED=1 cannot apply: {blocked_reason}"
    if forced == "0":
        return [CHANNELS_LAST], "RESNET_FAST_CPU_BLOCKED=0"
    if blocked_reason is not None:
        return [CHANNELS_LAST], blocked_reason
    if forced == "1":
        return [BLOCKED], "RESNET_FAST_CPU_BLOCKED=1"
    return [CHANNELS_LAST, BLOCKED], ""


def _choose_kernels(model: nn.Module, stem: Unit, blocks: list[Block], timing: _Timing) -> tuple[str, str]:
    """Set every unit's kernel and why; return the trunk's layout and why it was chosen."""
    trunk = [u for block in blocks for u in ([block.downsample] if block.downsample else []) + block.main]
    _choose_unit(stem, CHANNELS_LAST, timing, always_time=False)
    layouts, layout_why = _layouts(model, timing.dtype)
    choices = {layout: [_choose_unit(u, layout, timing, always_time=len(layouts) > 1, record=False)
                        for u in trunk] for layout in layouts}
    if len(layouts) == 1:
        layout = layouts[0]
        why = f"residual stages on {layout} ({layout_why})"
    else:
        totals = {layout: sum(seconds for _, _, seconds in choices[layout]) for layout in layouts}
        totals[BLOCKED] += _conversion_seconds(model, stem, trunk[-1])
        layout = min(totals, key=totals.get)
        other = next(name for name in totals if name != layout)
        why = (f"residual stages on {layout}: measured, their units (and the layout change) "
               f"{totals[layout] * 1e3:.1f} ms < {other} {totals[other] * 1e3:.1f} ms")
    for unit, (kernel, unit_why, _) in zip(trunk, choices[layout]):
        unit.kernel, unit.why = kernel, unit_why
    return layout, why


def _choose_unit(unit: Unit, layout: str, timing: _Timing, always_time: bool,
                 record: bool = True) -> tuple[str, str, float]:
    """(kernel, why, seconds) for ``unit`` in ``layout``; seconds is 0 where nothing was timed."""
    kernels, rule = _candidates(unit, layout, timing.dtype)
    if len(kernels) == 1 and not always_time:
        kernel, why, seconds = kernels[0], rule if rule.startswith("RESNET") else "rule: " + rule, 0.0
    else:
        times = _unit_times(unit, layout, kernels, timing)
        kernel = min(times, key=times.get)
        if len(kernels) > 1:
            why = "measured: " + cpu_select.describe_times(times, kernel)
        else:
            why = f"{rule} ({times[kernel] * 1e3:.2f} ms)"
        seconds = times[kernel]
    if record:
        unit.kernel, unit.why = kernel, why
    return kernel, why, seconds


def _conversion_seconds(model: nn.Module, stem: Unit, last: Unit) -> float:
    """What the blocked layout costs beyond its units: entering it in the max-pool (against the
    plain max-pool) and leaving it after layer4."""
    generator = torch.Generator().manual_seed(0)
    stem_out = torch.randn(stem.out_shape, generator=generator).contiguous(memory_format=torch.channels_last)
    last_out = _blocked().to_blocked(torch.randn(last.out_shape, generator=generator))
    shapes = f"{tuple(stem.out_shape)} {tuple(last.out_shape)} t{torch.get_num_threads()}"
    pool = model.maxpool
    pool_tag = repr(pool)
    enter = cpu_select.seconds(f"max_pool_to_blocked {pool_tag} {shapes}",
                               lambda: _blocked().max_pool_to_blocked(stem_out, pool))
    plain = cpu_select.seconds(f"max_pool {pool_tag} {shapes}", lambda: pool(stem_out))
    leave = cpu_select.seconds(f"from_blocked {shapes}", lambda: _blocked().from_blocked(last_out).contiguous(
        memory_format=torch.channels_last))
    return max(enter - plain, 0.0) + leave


# ------------------------------------------------------------------------------------------
# explain

def explain(model: nn.Module, x: Tensor) -> ExecutionPlan:
    """The plan ``model(x)`` runs in the current context, every unit's kernel named.

    A planned trunk names its kernels when built. For a per-call plan, one pass on ``x`` is
    recorded (on a copy of the model in training mode, so running statistics stay as they are).
    """
    plan = plan_for(model, x)
    if plan.kind == "planned trunk" or plan._explained:
        return plan
    subject = copy.deepcopy(model) if model.training else model
    with trace.recording() as entries:
        subject.forward_features(x)
    units = plan.units()
    if len(entries) != len(units) or not plan.blocks:
        raise RuntimeError(f"explain recorded {len(entries)} kernels for {len(units)} units; "
                           "a unit ran outside resnet_fast's dispatch")
    for unit, (kernel, why) in zip(units, entries):
        unit.kernel, unit.why = kernel, why
    plan._explained = True
    return plan
