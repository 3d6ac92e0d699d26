"""Fused modules that own stock ``nn.Conv2d`` / ``nn.BatchNorm2d`` parameters."""

from resnet_fast.nn.fused import ConvBNAct, clear_fold_cache, conv_bn_unit, folded_conv

__all__ = ["ConvBNAct", "clear_fold_cache", "conv_bn_unit", "folded_conv"]
