"""Block-level benchmarks: one fused unit (conv -> BN (-> + residual) -> ReLU) at every conv shape of ResNet-50.

Providers in each group: ``stock`` (``nn.Conv2d -> nn.BatchNorm2d -> add -> ReLU``,
eager) and ``fused-<backend>`` (:class:`resnet_fast.ConvBNAct` with ``backend=``)
for every backend available on the device; for CPU eval also ``fused-extension-blocked``,
the unit as FastResNet runs it inside its residual stages (``resnet_fast.ops.blocked``:
input, residual and output in 8-channel blocks, converted outside the timed call).
Eval runs under ``torch.inference_mode()`` (as users run inference), every provider alike; train
runs forward + backward (input, residual and parameter gradients).

CPU: batch 4, fp32, channels_last. GPU: batch 128, bf16, channels_last.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor, nn

from resnet_fast.nn import ConvBNAct
from resnet_fast.nn.fused import folded_conv
from resnet_fast.ops import blocked

from _helpers import available_backends, record_throughput, suite_device, synchronized  # benchmarks/_helpers.py

DEVICE = suite_device()
ON_GPU = DEVICE.type == "cuda"
FUSED_BACKENDS = available_backends(DEVICE)
BATCH = int(os.environ.get("RESNET_FAST_BENCH_BLOCK_BATCH", 128 if ON_GPU else 4))
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
MEMORY_FORMAT = torch.channels_last
# Rounds per benchmark: enough for a stable median on the GPU, few on a 2-core CPU (144 benchmarks in all).
ROUNDS, WARMUP = (30, 5) if ON_GPU else (3, 1)


@dataclasses.dataclass(frozen=True)
class UnitShape:
    """One conv unit of ResNet-50 at 224x224: where it is, its conv, and its epilogue."""

    name: str           # first module using this shape, e.g. "layer2.0.conv2"
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    in_size: int        # input height = width
    residual: bool      # conv3 of a bottleneck: + identity before the ReLU
    relu: bool          # False for the downsample branch

    @property
    def out_size(self) -> int:
        return (self.in_size + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1

    @property
    def label(self) -> str:
        channels = f"{self.in_channels}" if self.in_channels == self.out_channels else \
            f"{self.in_channels}->{self.out_channels}"
        stride = f"/{self.stride}" if self.stride > 1 else ""
        epilogue = "+add" if self.residual else ("" if self.relu else " no-relu")
        return f"{self.name} {self.kernel}x{self.kernel}{stride} {channels}@{self.in_size}{epilogue}"

    def flops(self, batch: int) -> float:
        """Forward multiply-adds x 2."""
        return 2.0 * batch * self.out_size ** 2 * self.out_channels * self.in_channels * self.kernel ** 2


def resnet50_unit_shapes() -> list[UnitShape]:
    """Every distinct conv unit of torchvision's ResNet-50, found by running it on the meta device."""
    import torchvision

    model = torchvision.models.resnet50().to("meta")
    shapes: dict[tuple, UnitShape] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Conv2d, inputs: tuple, output: Tensor) -> None:
            role_residual = name.endswith("conv3")
            role_relu = "downsample" not in name
            key = (module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
                   inputs[0].shape[-1], role_residual, role_relu)
            shapes.setdefault(key, UnitShape(name, *key))
        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return list(shapes.values())


SHAPES = resnet50_unit_shapes()


class StockUnit(nn.Module):
    """The eager PyTorch unit: ``relu(bn(conv(x)) + residual)``."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        out = self.bn(self.conv(x))
        if residual is not None:
            out = out + residual
        return torch.relu(out) if self.relu else out


class BlockedUnit(nn.Module):
    """The eval unit on 8-channel blocks, as FastResNet's residual stages run it on CPU."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return blocked.conv_bias_act(x, folded_conv(self.conv, self.bn, torch.float32), residual, self.relu)


def make_unit(shape: UnitShape, provider: str, train: bool) -> nn.Module:
    """Seeded conv + BN with non-trivial statistics, wrapped as the stock unit or a fused one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.kernel // 2, bias=False)
    bn = nn.BatchNorm2d(shape.out_channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)
    if provider == "stock":
        unit = StockUnit(conv, bn, shape.relu)
    elif provider == BLOCKED:
        unit = BlockedUnit(conv, bn, shape.relu)
    else:
        unit = ConvBNAct.from_modules(conv, bn, relu=shape.relu, backend=provider.removeprefix("fused-"))
    unit = unit.to(device=DEVICE, dtype=DTYPE, memory_format=MEMORY_FORMAT)
    return unit.train(train)


def make_inputs(shape: UnitShape, train: bool) -> tuple[Tensor, Optional[Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, shape.in_channels, shape.in_size, shape.in_size, generator=generator)
    x = x.to(DEVICE, DTYPE).contiguous(memory_format=MEMORY_FORMAT)
    residual = None
    if shape.residual:
        residual = torch.randn(BATCH, shape.out_channels, shape.out_size, shape.out_size, generator=generator)
        residual = residual.to(DEVICE, DTYPE).contiguous(memory_format=MEMORY_FORMAT)
    if train:
        x.requires_grad_(True)
        if residual is not None:
            residual.requires_grad_(True)
    return x, residual


PROVIDERS = ["stock"] + [f"fused-{name}" for name in FUSED_BACKENDS]
BLOCKED = "fused-extension-blocked"
EVAL_PROVIDERS = PROVIDERS + ([BLOCKED] if not ON_GPU and "extension" in FUSED_BACKENDS and blocked.available() else [])


def _run_block(benchmark, shape: UnitShape, provider: str, train: bool) -> None:
    unit = make_unit(shape, provider, train)
    x, residual = make_inputs(shape, train)
    memory_format = "channels_last"
    if provider == BLOCKED:
        x, residual = blocked.to_blocked(x), None if residual is None else blocked.to_blocked(residual)
        memory_format = "8-channel blocks"
    if train:
        grad_out = torch.randn(BATCH, shape.out_channels, shape.out_size, shape.out_size, device=DEVICE,
                               dtype=DTYPE).contiguous(memory_format=MEMORY_FORMAT)

        def step() -> Tensor:
            out = unit(x, residual)
            out.backward(grad_out)
            return out
        run = step
    else:
        def infer() -> Tensor:
            with torch.inference_mode():
                return unit(x, residual)
        run = infer
    benchmark.group = f"block-{'train' if train else 'eval'}:{shape.label}"
    benchmark.pedantic(synchronized(run, DEVICE), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    flops = shape.flops(BATCH) * (3 if train else 1)  # backward: grad input + grad weight, each as big as forward
    record_throughput(benchmark, DEVICE, images=BATCH, flops=flops, provider=provider, batch=BATCH,
                      dtype=str(DTYPE).replace("torch.", ""), memory_format=memory_format)


# The stem (3 input channels) stays channels_last in FastResNet: no blocked unit for it.
EVAL_CASES = [(shape, provider) for shape in SHAPES for provider in EVAL_PROVIDERS
              if not (provider == BLOCKED and shape.in_channels % blocked.CHANNEL_BLOCK)]


@pytest.mark.parametrize("shape,provider", EVAL_CASES,
                         ids=[f"{shape.label.replace(' ', '_')}-{provider}" for shape, provider in EVAL_CASES])
def test_block_eval(benchmark, shape: UnitShape, provider: str) -> None:
    _run_block(benchmark, shape, provider, train=False)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.label.replace(" ", "_") for s in SHAPES])
def test_block_train(benchmark, shape: UnitShape, provider: str) -> None:
    _run_block(benchmark, shape, provider, train=True)
