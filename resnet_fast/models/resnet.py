"""FastResNet: torchvision's ResNet family with fused residual blocks.

Module names, state_dict keys, constructor arguments and parameter
initialisation are those of ``torchvision.models.resnet``, so checkpoints load
with ``strict=True`` in both directions. Each ``conv -> bn (-> + identity) -> relu``
runs as one fused unit (:func:`resnet_fast.nn.conv_bn_unit`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional, Type, Union

import torch
from torch import Tensor, nn

from resnet_fast import backends
from resnet_fast.models import plan as _plan
from resnet_fast.models import weights as _weights  # torchvision's weights enums, imported only when asked for
from resnet_fast.nn.fused import clear_fold_cache, conv_bn_unit, norm_kind
from resnet_fast.ops.activation_pool import ActivationPool

__all__ = ["FastResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
           "UnfusedUnitsWarning"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _check_norm_layer(norm_layer: Optional[Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    """torchvision's rule: any callable that makes a norm module from a channel count (default BatchNorm2d)."""
    if norm_layer is None:
        return nn.BatchNorm2d
    if not callable(norm_layer):
        raise TypeError(f"norm_layer must be a callable returning an nn.Module, got {norm_layer!r}")
    return norm_layer


def _traced(x: Any) -> bool:
    """Whether ``torch.fx.symbolic_trace`` or ``torch.jit.trace`` is recording this call: the model then
    runs torchvision's own forward over the stock modules, so the recorded program is torchvision's
    (same node names; parameters referenced, not folded copies baked in as constants).
    ``torch.jit.script`` compiles that same forward (``torch.jit.is_scripting()``)."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()


def _identity(x: Tensor, downsample: Optional[nn.Module], backend: Optional[str]) -> Tensor:
    if downsample is None:
        return x
    return conv_bn_unit(x, downsample[0], downsample[1], relu=False, backend=backend)


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
        if torch.jit.is_scripting():  # on its own: TorchScript then compiles nothing after it
            return self._stock_forward(x)
        if _traced(x):
            return self._stock_forward(x)
        identity = _identity(x, self.downsample, self.backend)
        out = conv_bn_unit(x, self.conv1, self.bn1, relu=True, backend=self.backend)
        return conv_bn_unit(out, self.conv2, self.bn2, residual=identity, relu=True, backend=self.backend)

    def _stock_forward(self, x: Tensor) -> Tensor:
        """torchvision's ``BasicBlock.forward``, module for module."""
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out



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
        if torch.jit.is_scripting():  # on its own: TorchScript then compiles nothing after it
            return self._stock_forward(x)
        if _traced(x):
            return self._stock_forward(x)
        identity = _identity(x, self.downsample, self.backend)
        out = conv_bn_unit(x, self.conv1, self.bn1, relu=True, backend=self.backend)
        out = conv_bn_unit(out, self.conv2, self.bn2, relu=True, backend=self.backend)
        return conv_bn_unit(out, self.conv3, self.bn3, residual=identity, relu=True, backend=self.backend)

    def _stock_forward(self, x: Tensor) -> Tensor:
        """torchvision's ``Bottleneck.forward``, module for module."""
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out



class FastResNet(nn.Module):
    """torchvision's ``ResNet`` with fused blocks.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in each of the four stages.
        num_classes: outputs of the final ``fc`` layer.
        zero_init_residual: zero the last BN weight of each block, so each block starts as the identity.
        groups, width_per_group: ResNeXt / wide ResNet width settings.
        replace_stride_with_dilation: per stage 2-4, use dilation instead of stride 2.
        norm_layer: makes each norm module from a channel count, as in torchvision. ``nn.BatchNorm2d``
            (default) is fused in training and eval; torchvision's ``FrozenBatchNorm2d`` is folded into
            the conv in both modes; any other norm (``GroupNorm``, ``SyncBatchNorm``, a custom module)
            runs unfused, correctly, with one warning at construction naming those units.
        small_input: a 3x3 stride-1 stem without max-pool, for 32x32 images (CIFAR-10 style).
        backend: pin every unit of this model to a backend (default: the selection rules of ``resnet_fast.backends``).

    Equivalent PyTorch: ``torchvision.models.ResNet(block, layers, ...)``.
    """

    __jit_unused_properties__ = ["activation_pool"]  # eager-only state; torch.jit.script skips it

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
        warn_unfused_units(self)

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
            backends.check_name(backend)
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
        if torch.jit.is_scripting():  # on its own: TorchScript then compiles nothing after it
            return self._stock_features(x)
        if _traced(x):
            return self._stock_features(x)
        if not isinstance(x, Tensor):
            raise TypeError(f"FastResNet expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FastResNet expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        with self.activation_pool.scope(x):
            if torch.compiler.is_compiling():  # the compiler traces the modules; no plan is timed or kept
                return _plan.per_call_features(self, x)
            return _plan.plan_for(self, x).run(self, x)

    def explain(self, x: Tensor) -> "_plan.ExecutionPlan":
        """The execution plan ``self(x)`` runs in the current context (grad mode, autocast, settings):
        every unit's input shape, kernel and why (the measured times, or the rule). ``print`` it.

        >>> print(model.eval().explain(torch.randn(8, 3, 224, 224)))
        """
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"explain expects images of shape (N, 3, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        with self.activation_pool.scope(x):  # plans are timed as forward times them: buffers pooled
            return _plan.explain(self, x)

    def _stock_features(self, x: Tensor) -> Tensor:
        """torchvision's ``ResNet._forward_impl`` up to ``layer4``, module for module."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x

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
        with warnings.catch_warnings():  # warned once below, after the norm layers are in place
            warnings.simplefilter("ignore", UnfusedUnitsWarning)
            fast = cls(block, layers, backend=backend, **config)
        _copy_norm_layers(model, fast)
        fast.load_state_dict(model.state_dict(), strict=True)
        warn_unfused_units(fast)
        reference = next(model.parameters())
        fast.to(device=reference.device, dtype=reference.dtype)
        return fast.train(model.training)

    def to_torchvision(self) -> nn.Module:
        """A ``torchvision.models.ResNet`` with this model's weights, buffers, norm layers, device, dtype and mode."""
        from torchvision.models import resnet as tv

        config = dict(self.config)
        block = tv.BasicBlock if config.pop("block") == "BasicBlock" else tv.Bottleneck
        small_input = config.pop("small_input")
        model = tv.ResNet(block, config.pop("layers"), **config)
        if small_input:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        _copy_norm_layers(self, model)
        model.load_state_dict(self.state_dict(), strict=True)
        reference = next(self.parameters())
        model.to(device=reference.device, dtype=reference.dtype)
        return model.train(self.training)


class UnfusedUnitsWarning(UserWarning):
    """Some conv + norm units of a FastResNet run through their stock modules (their norm layer is not fused)."""


def _unit_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the norm layer of every conv + norm unit of a ResNet: stem, blocks, downsamples."""
    norms = [("bn1", model.bn1)]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(model, stage)):
            prefix = f"{stage}.{index}."
            norms += [(prefix + name, module) for name, module in block.named_children() if name.startswith("bn")]
            if block.downsample is not None:
                norms.append((prefix + "downsample.1", block.downsample[1]))
    return norms


def _copy_norm_layers(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the norm layers of ``source`` (same structure): the same settings (eps, momentum, ...),
    and a copy of any norm that is not a plain ``nn.BatchNorm2d``. Weights and buffers follow with the
    state_dict."""
    source_norms = dict(_unit_norms(source))
    for name, norm in _unit_norms(target):
        theirs = source_norms[name]
        same_kind = type(theirs) is nn.BatchNorm2d and type(norm) is nn.BatchNorm2d and (
            (theirs.affine, theirs.track_running_stats) == (norm.affine, norm.track_running_stats))
        if same_kind:
            norm.eps, norm.momentum = theirs.eps, theirs.momentum
        else:
            parent, _, attr = name.rpartition(".")
            setattr(target.get_submodule(parent) if parent else target, attr, copy.deepcopy(theirs))


def warn_unfused_units(model: nn.Module) -> None:
    """One warning naming the units whose norm layer runs unfused (see :func:`resnet_fast.nn.fused.norm_kind`)."""
    norms = _unit_norms(model)
    unfused = [(name, norm) for name, norm in norms if norm_kind(norm) == "unfused"]
    if not unfused:
        return
    kinds = sorted({type(norm).__name__ for _, norm in unfused})
    names = ", ".join(name for name, _ in unfused[:4]) + (", ..." if len(unfused) > 4 else "")
    warnings.warn(f"FastResNet: {len(unfused)} of {len(norms)} conv + norm units run unfused through their stock "
                  f"modules ({', '.join(kinds)}; only nn.BatchNorm2d and FrozenBatchNorm2d are fused): {names}",
                  UnfusedUnitsWarning, stacklevel=3)


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
    """torchvision's ``_resnet``: ``weights`` (already verified) fixes ``num_classes`` and loads its checkpoint."""
    if weights is not None:
        _weights.overwrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = FastResNet(block, layers, **kwargs)
    if weights is not None:
        _weights.load_pretrained(model, weights, progress)
    return model


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-18. Equivalent PyTorch: ``torchvision.models.resnet18(**kwargs)``.

    ``weights``: a ``torchvision.models.ResNet18_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("resnet18", weights, kwargs)
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-34. Equivalent PyTorch: ``torchvision.models.resnet34(**kwargs)``.

    ``weights``: a ``torchvision.models.ResNet34_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("resnet34", weights, kwargs)
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-50. Equivalent PyTorch: ``torchvision.models.resnet50(**kwargs)``.

    ``weights``: a ``torchvision.models.ResNet50_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("resnet50", weights, kwargs)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-101. Equivalent PyTorch: ``torchvision.models.resnet101(**kwargs)``.

    ``weights``: a ``torchvision.models.ResNet101_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("resnet101", weights, kwargs)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNet-152. Equivalent PyTorch: ``torchvision.models.resnet152(**kwargs)``.

    ``weights``: a ``torchvision.models.ResNet152_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("resnet152", weights, kwargs)
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNeXt-50 32x4d. Equivalent PyTorch: ``torchvision.models.resnext50_32x4d(**kwargs)``.

    ``weights``: a ``torchvision.models.ResNeXt50_32X4D_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("resnext50_32x4d", weights, kwargs)
    _weights.overwrite_named_param(kwargs, "groups", 32)
    _weights.overwrite_named_param(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNeXt-101 32x8d. Equivalent PyTorch: ``torchvision.models.resnext101_32x8d(**kwargs)``.

    ``weights``: a ``torchvision.models.ResNeXt101_32X8D_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("resnext101_32x8d", weights, kwargs)
    _weights.overwrite_named_param(kwargs, "groups", 32)
    _weights.overwrite_named_param(kwargs, "width_per_group", 8)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """ResNeXt-101 64x4d. Equivalent PyTorch: ``torchvision.models.resnext101_64x4d(**kwargs)``.

    ``weights``: a ``torchvision.models.ResNeXt101_64X4D_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("resnext101_64x4d", weights, kwargs)
    _weights.overwrite_named_param(kwargs, "groups", 64)
    _weights.overwrite_named_param(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """Wide ResNet-50-2. Equivalent PyTorch: ``torchvision.models.wide_resnet50_2(**kwargs)``.

    ``weights``: a ``torchvision.models.Wide_ResNet50_2_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("wide_resnet50_2", weights, kwargs)
    _weights.overwrite_named_param(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> FastResNet:
    """Wide ResNet-101-2. Equivalent PyTorch: ``torchvision.models.wide_resnet101_2(**kwargs)``.

    ``weights``: a ``torchvision.models.Wide_ResNet101_2_Weights`` member or its name (``"DEFAULT"``), loaded
    like torchvision's from torch.hub's cache (downloaded there first if missing).
    """
    weights = _weights.verify("wide_resnet101_2", weights, kwargs)
    _weights.overwrite_named_param(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


ARCHITECTURES: dict[str, Callable[..., FastResNet]] = {
    fn.__name__: fn for fn in (resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d,
                               resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)
}
