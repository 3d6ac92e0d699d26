"""FastResNet models: torchvision's ResNet family with fused blocks."""

from resnet_fast.models.resnet import ARCHITECTURES, BasicBlock, Bottleneck, FastResNet

__all__ = ["ARCHITECTURES", "BasicBlock", "Bottleneck", "FastResNet"]
