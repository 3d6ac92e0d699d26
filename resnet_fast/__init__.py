"""resnet_fast: the ResNet family with fused conv + BatchNorm + residual + ReLU kernels.

A drop-in for ``torchvision.models.resnet*``: same module names and state_dict
keys, same numbers, faster. Importing never fails when the compiled extension
or triton is missing, and never initialises CUDA.
"""

from resnet_fast.backends import BACKENDS, BackendUnavailableError, is_available, unavailable_reason, use_backend
from resnet_fast.models.resnet import (
    BasicBlock,
    Bottleneck,
    FastResNet,
    UnfusedUnitsWarning,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from resnet_fast.nn import ConvBNAct
from resnet_fast.ops import conv_bn_act

from resnet_fast._version import __version__

__all__ = [
    "BACKENDS", "BackendUnavailableError", "is_available", "unavailable_reason", "use_backend",
    "FastResNet", "BasicBlock", "Bottleneck", "ConvBNAct", "conv_bn_act", "UnfusedUnitsWarning",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]
