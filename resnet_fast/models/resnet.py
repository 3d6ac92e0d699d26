"""FastResNet: torchvision's ResNet family with fused residual blocks.

Module names, state_dict keys, constructor arguments and parameter
initialisation are those of ``torchvision.models.resnet``, so checkpoints load
with ``strict=True`` in both directions. Each ``conv -> bn (-> + identity) -> relu``
runs as one fused unit (:func:`resnet_fast.nn.conv_bn_unit`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Type, Union

import torch
from torch import Tensor, nn

from resnet_fast import backends
from resnet_fast.nn.fused import check_unit_modules, clear_fold_cache, conv_bn_unit, folded_conv
from resnet_fast.ops import blocked
from resnet_fast.ops.activation_pool import ActivationPool

__all__ = ["FastResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _check_norm_layer(norm_layer: Optional[Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    if norm_layer is None:
        return nn.BatchNorm2d
    if not (isinstance(norm_layer, type) and issubclass(norm_layer, nn.BatchNorm2d)
            and not issubclass(norm_layer, nn.SyncBatchNorm)):
        raise ValueError(f"FastResNet fuses nn.BatchNorm2d only; norm_layer={norm_layer!r} is not supported")
    return norm_layer


def _identity(x: Tensor, downsample: Optional[nn.Module], backend: Optional[str]) -> Tensor:
    if downsample is None:
        return x
    return conv_bn_unit(x, downsample[0], downsample[1], relu=False, backend=backend)


def _blocked_unit(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Optional[Tensor] = None,
                  relu: bool = True) -> Tensor:
    """:func:`conv_bn_unit` in eval mode, on activations in 8-channel blocks (``resnet_fast.ops.blocked``).
    A residual may be overwritten by the result: the trunk's block inputs are its own."""
    return blocked.conv_bias_act(x, folded_conv(conv, bn, torch.float32), residual, relu, overwrite_residual=True)


def _blocked_identity(x: Tensor, downsample: Optional[nn.Module]) -> Tensor:
    return x if downsample is None else _blocked_unit(x, downsample[0], downsample[1], relu=False)


def _block_units(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The (conv, bn) pairs of a residual block, downsample included."""
    names = ("conv1", "conv2", "conv3") if isinstance(block, Bottleneck) else ("conv1", "conv2")
    units = [(getattr(block, name), getattr(block, "bn" + name[-1])) for name in names]
    if block.downsample is not None:
        units.append((block.downsample[0], block.downsample[1]))
    return units


class BasicBlock(nn.Module):
    """Two 3x3 conv units; the second adds the identity before its ReLU (torchvision's BasicBlock)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = _check_norm_layer(norm_layer)
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.backend: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        identity = _identity(x, self.downsample, self.backend)
        out = conv_bn_unit(x, self.conv1, self.bn1, relu=True, backend=self.backend)
        return conv_bn_unit(out, self.conv2, self.bn2, residual=identity, relu=True, backend=self.backend)

    def _forward_blocked(self, x: Tensor) -> Tensor:
        """:meth:`forward` in eval mode on CPU float32 activations in 8-channel blocks, for
        FastResNet's trunk only: ``x`` may be overwritten (it can become the output)."""
        identity = _blocked_identity(x, self.downsample)
        out = _blocked_unit(x, self.conv1, self.bn1)
        return _blocked_unit(out, self.conv2, self.bn2, residual=identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, groups, dilation) -> 1x1 units; the last adds the identity (torchvision's Bottleneck)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = _check_norm_layer(norm_layer)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.backend: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        identity = _identity(x, self.downsample, self.backend)
        out = conv_bn_unit(x, self.conv1, self.bn1, relu=True, backend=self.backend)
        out = conv_bn_unit(out, self.conv2, self.bn2, relu=True, backend=self.backend)
        return conv_bn_unit(out, self.conv3, self.bn3, residual=identity, relu=True, backend=self.backend)

    def _forward_blocked(self, x: Tensor) -> Tensor:
        """:meth:`forward` in eval mode on CPU float32 activations in 8-channel blocks, for
        FastResNet's trunk only: ``x`` may be overwritten (it can become the output)."""
        identity = _blocked_identity(x, self.downsample)
        out = _blocked_unit(x, self.conv1, self.bn1)
        out = _blocked_unit(out, self.conv2, self.bn2)
        return _blocked_unit(out, self.conv3, self.bn3, residual=identity)


class FastResNet(nn.Module):
    """torchvision's ``ResNet`` with fused blocks.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in each of the four stages.
        num_classes: outputs of the final ``fc`` layer.
        zero_init_residual: zero the last BN weight of each block, so each block starts as the identity.
        groups, width_per_group: ResNeXt / wide ResNet width settings.
        replace_stride_with_dilation: per stage 2-4, use dilation instead of stride 2.
        norm_layer: ``nn.BatchNorm2d`` (or a subclass); other norms cannot be fused.
        small_input: a 3x3 stride-1 stem without max-pool, for 32x32 images (CIFAR-10 style).
        backend: pin every unit of this model to a backend (default: the selection rules of ``resnet_fast.backends``).

    Equivalent PyTorch: ``torchvision.models.ResNet(block, layers, ...)``.
    """

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[list[bool]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        small_input: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        norm_layer = _check_norm_layer(norm_layer)
        self._norm_layer = norm_layer
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers!r}")
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None "
                             f"or a 3-element tuple, got {replace_stride_with_dilation}")
        self.config = dict(block=block.__name__, layers=list(layers), num_classes=num_classes, groups=groups,
                           width_per_group=width_per_group,
                           replace_stride_with_dilation=list(replace_stride_with_dilation), small_input=small_input)
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        if small_input:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)
        self.set_backend(backend)

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def set_backend(self, backend: Optional[str]) -> "FastResNet":
        """Pin every fused unit to ``backend`` (None: follow ``use_backend`` / env / auto)."""
        if backend is not None:
            from resnet_fast.backends import _check_name

            _check_name(backend)
        self.backend = backend
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                m.backend = backend
        return self

    def refresh(self) -> "FastResNet":
        """Drop the cached folded weights (they are also rebuilt automatically when a parameter changes)."""
        clear_fold_cache(self)
        return self

    @property
    def activation_pool(self) -> ActivationPool:
        """The CPU buffers kept between passes (``resnet_fast.ops.activation_pool``):
        ``.stats()`` shows what it holds, ``.release()`` frees it now."""
        pool = self.__dict__.get("_activation_pool")
        if pool is None:  # created on first use, so models pickled before it existed still load
            pool = self.__dict__["_activation_pool"] = ActivationPool()
        return pool

    def forward_features(self, x: Tensor) -> Tensor:
        """The trunk up to ``layer4``: (N, 512 * expansion, H/32, W/32) feature maps."""
        if not isinstance(x, Tensor):
            raise TypeError(f"FastResNet expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FastResNet expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        with self.activation_pool.scope(x):
            x = conv_bn_unit(x, self.conv1, self.bn1, relu=True, backend=self.backend)
            if self._runs_blocked(x):
                x = blocked.max_pool_to_blocked(x, self.maxpool)
                for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                    for block in layer:
                        x = block._forward_blocked(x)
                return blocked.from_blocked(x)
            x = self.maxpool(x)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            return self.layer4(x)

    def _runs_blocked(self, x: Tensor) -> bool:
        """Whether the residual stages can run on 8-channel blocks (``resnet_fast.ops.blocked``)
        with the same result as calling them: CPU float32 inference on the extension backend,
        every unit folded, supported shapes, a stock max-pool, and no hooks on a module it skips."""
        if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4):
            return False
        if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu") or not blocked.available():
            return False
        if not blocked.enabled():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        if (type(self.maxpool) not in (nn.MaxPool2d, nn.Identity) or self.maxpool._forward_hooks
                or self.maxpool._forward_pre_hooks):
            return False
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        for layer in layers:
            if not isinstance(layer, nn.Sequential) or layer._forward_hooks or layer._forward_pre_hooks:
                return False
            for block in layer:
                if type(block) not in (BasicBlock, Bottleneck) or block._forward_hooks or block._forward_pre_hooks:
                    return False
                if backends.resolve(block.backend, x.device) != "extension":
                    return False
                for conv, bn in _block_units(block):
                    if (bn.training or not bn.track_running_stats or bn.running_mean is None
                            or conv.weight.dtype != torch.float32
                            or not blocked.conv_supported(conv)):
                        return False
        return self.layer1[0].conv1.in_channels == x.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    @classmethod
    def from_torchvision(cls, model: nn.Module, backend: Optional[str] = None) -> "FastResNet":
        """A FastResNet with ``model``'s configuration, weights, buffers, BN settings, device, dtype and mode."""
        config = _infer_config(model)
        block = BasicBlock if config.pop("block") == "BasicBlock" else Bottleneck
        layers = config.pop("layers")
        fast = cls(block, layers, backend=backend, **config)
        fast.load_state_dict(model.state_dict(), strict=True)
        fast_modules = dict(fast.named_modules())
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                fast_modules[name].eps, fast_modules[name].momentum = module.eps, module.momentum
        reference = next(model.parameters())
        fast.to(device=reference.device, dtype=reference.dtype)
        return fast.train(model.training)

    def to_torchvision(self) -> nn.Module:
        """A ``torchvision.models.ResNet`` with this model's weights, buffers, device, dtype and mode."""
        from torchvision.models import resnet as tv

        config = dict(self.config)
        block = tv.BasicBlock if config.pop("block") == "BasicBlock" else tv.Bottleneck
        small_input = config.pop("small_input")
        model = tv.ResNet(block, config.pop("layers"), **config)
        if small_input:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        model.load_state_dict(self.state_dict(), strict=True)
        tv_modules = dict(model.named_modules())
        for name, module in self.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                tv_modules[name].eps, tv_modules[name].momentum = module.eps, module.momentum
        reference = next(self.parameters())
        model.to(device=reference.device, dtype=reference.dtype)
        return model.train(self.training)


def _infer_config(model: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a torchvision-style ResNet, read off its modules."""
    missing = [name for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
               if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a torchvision ResNet (missing {', '.join(missing)})")
    first = model.layer1[0]
    kind = type(first).__name__
    if kind not in ("BasicBlock", "Bottleneck"):
        raise TypeError(f"unsupported residual block {kind}; expected torchvision's BasicBlock or Bottleneck")
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and type(module) is not nn.BatchNorm2d:
            raise TypeError(f"{name} is a {type(module).__name__}; FastResNet fuses nn.BatchNorm2d only")
    if kind == "Bottleneck":
        groups = first.conv2.groups
        width_per_group = first.conv2.out_channels // groups
    else:
        groups, width_per_group = 1, 64
    stage_dilations = [1] + [getattr(model, f"layer{i}")[-1].conv2.dilation[0] for i in (2, 3, 4)]
    return dict(
        block=kind,
        layers=[len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)],
        num_classes=model.fc.out_features,
        groups=groups,
        width_per_group=width_per_group,
        replace_stride_with_dilation=[stage_dilations[i + 1] > stage_dilations[i] for i in range(3)],
        small_input=tuple(model.conv1.kernel_size) == (3, 3),
    )


def _resnet(block: Type[Union[BasicBlock, Bottleneck]], layers: list[int], weights: Any, progress: bool,
            **kwargs: Any) -> FastResNet:
    if weights is not None:
        raise ValueError("pretrained weights are not downloaded by resnet_fast: build the torchvision model with "
                         "its weights and convert it with FastResNet.from_torchvision(model), or load a "
                         "torchvision state_dict with model.load_state_dict(...)")
    return FastResNet(block, layers, **kwargs)


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-18. Equivalent PyTorch: ``torchvision.models.resnet18(**kwargs)``."""
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-34. Equivalent PyTorch: ``torchvision.models.resnet34(**kwargs)``."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-50. Equivalent PyTorch: ``torchvision.models.resnet50(**kwargs)``."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-101. Equivalent PyTorch: ``torchvision.models.resnet101(**kwargs)``."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-152. Equivalent PyTorch: ``torchvision.models.resnet152(**kwargs)``."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNeXt-50 32x4d. Equivalent PyTorch: ``torchvision.models.resnext50_32x4d(**kwargs)``."""
    kwargs.update(groups=32, width_per_group=4)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNeXt-101 32x8d. Equivalent PyTorch: ``torchvision.models.resnext101_32x8d(**kwargs)``."""
    kwargs.update(groups=32, width_per_group=8)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNeXt-101 64x4d. Equivalent PyTorch: ``torchvision.models.resnext101_64x4d(**kwargs)``."""
    kwargs.update(groups=64, width_per_group=4)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """Wide ResNet-50-2. Equivalent PyTorch: ``torchvision.models.wide_resnet50_2(**kwargs)``."""
    kwargs["width_per_group"] = 64 * 2
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """Wide ResNet-101-2. Equivalent PyTorch: ``torchvision.models.wide_resnet101_2(**kwargs)``."""
    kwargs["width_per_group"] = 64 * 2
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


ARCHITECTURES: dict[str, Callable[..., FastResNet]] = {
    fn.__name__: fn for fn in (resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d,
                               resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)
}
