"""Pretrained weights for the factories, through torchvision's own weights enums.

``resnet_fast.resnet50(weights="IMAGENET1K_V2")`` must mean exactly what it means
for ``torchvision.models.resnet50``: the same accepted values, the same errors,
the same checkpoint file. So the weights are torchvision's ``WeightsEnum`` members,
checked with their ``verify`` and loaded with their ``get_state_dict`` (torch.hub's
cache under ``TORCH_HOME``, so a checkpoint torchvision already downloaded is reused).
FastResNet's state_dict keys are torchvision's, so the checkpoint loads strictly.

torchvision is imported only when weights are asked for: ``import resnet_fast``
never imports it, and building a model without weights never needs it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = ["WEIGHTS_ENUMS", "weights_enum", "verify", "overwrite_named_param", "load_pretrained"]

# Factory name -> name of its weights enum in ``torchvision.models`` (public, in its ``__all__``).
WEIGHTS_ENUMS: dict[str, str] = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
    "resnext50_32x4d": "ResNeXt50_32X4D_Weights",
    "resnext101_32x8d": "ResNeXt101_32X8D_Weights",
    "resnext101_64x4d": "ResNeXt101_64X4D_Weights",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights",
    "wide_resnet101_2": "Wide_ResNet101_2_Weights",
}

# What torchvision's ``handle_legacy_interface`` maps ``pretrained=True`` to, for every ResNet factory.
_LEGACY_PRETRAINED = "IMAGENET1K_V1"


def _torchvision_models() -> Any:
    """``torchvision.models``, imported on first use so that resnet_fast does not depend on torchvision."""
    try:
        import torchvision.models
    except ImportError as error:
        raise ImportError("pretrained weights for resnet_fast models come from torchvision, which is not "
                          "installed: pip install torchvision") from error
    return torchvision.models


def weights_enum(arch: str) -> type[WeightsEnum]:
    """torchvision's weights enum for the factory ``arch`` (``"resnet50"`` -> ``ResNet50_Weights``)."""
    models = _torchvision_models()
    name = WEIGHTS_ENUMS[arch]
    enum = getattr(models, name, None)
    if enum is None:
        import torchvision

        raise ImportError(f"torchvision {torchvision.__version__} has no torchvision.models.{name}, the weights "
                          f"of {arch}: install a torchvision that has it (pip install -U torchvision)")
    return enum


def _legacy_pretrained(arch: str, weights: Any, kwargs: dict[str, Any]) -> Any:
    """torchvision's ``handle_legacy_interface(weights=("pretrained", <Enum>.IMAGENET1K_V1))``, same warnings.

    ``pretrained=True/False`` (popped from ``kwargs``) and a non-enum, non-string ``weights``
    (``weights=True``, the positional ``pretrained`` of old) become ``IMAGENET1K_V1`` or ``None``.
    Anything else is returned unchanged. A ``weights=None`` passed explicitly cannot be told from
    the default here, so ``weights=None, pretrained=True`` loads weights (torchvision's builder
    would reject the stray ``pretrained`` with a TypeError).
    """
    if isinstance(weights, str):
        old_positional = weights == "legacy"
    elif weights is None:
        old_positional = False
    else:
        old_positional = not isinstance(weights, _torchvision_models().WeightsEnum)
    if not old_positional and not (weights is None and "pretrained" in kwargs):
        return weights

    if old_positional:
        pretrained, _ = weights, kwargs.pop("pretrained", None)
    else:
        pretrained = kwargs.pop("pretrained")
    default = weights_enum(arch)[_LEGACY_PRETRAINED] if pretrained else None

    # stacklevel 4: this function <- verify <- the factory <- the caller.
    if not old_positional:
        warnings.warn("The parameter 'pretrained' is deprecated since 0.13 and may be removed in the future, "
                      "please use 'weights' instead.", stacklevel=4)
    msg = ("Arguments other than a weight enum or `None` for 'weights' are deprecated since 0.13 and may be "
           f"removed in the future. The current behavior is equivalent to passing `weights={default}`.")
    if pretrained:
        msg = f"{msg} You can also use `weights={type(default).__name__}.DEFAULT` to get the most up-to-date weights."
    warnings.warn(msg, stacklevel=4)
    return default


def verify(arch: str, weights: Any, kwargs: dict[str, Any]) -> Optional[WeightsEnum]:
    """The factory's ``weights`` as torchvision resolves it: legacy ``pretrained=`` first, then ``Enum.verify``.

    Accepts a member of ``arch``'s enum, its name (``"DEFAULT"``, ``"IMAGENET1K_V1"``) or full name
    (``"ResNet50_Weights.IMAGENET1K_V2"``); raises what torchvision raises otherwise (KeyError for an
    unknown name, TypeError for another architecture's enum). ``kwargs`` loses ``pretrained``.
    """
    weights = _legacy_pretrained(arch, weights, kwargs)
    if weights is None:
        return None
    return weights_enum(arch).verify(weights)


def overwrite_named_param(kwargs: dict[str, Any], param: str, new_value: Any) -> None:
    """torchvision's ``_ovewrite_named_param``: set ``param``, or raise if the caller gave another value.

    Reimplemented (five lines) rather than imported, since it is private to torchvision and the
    factories need it without torchvision installed (``groups`` of the ResNeXt factories).
    """
    if param in kwargs:
        if kwargs[param] != new_value:
            raise ValueError(f"The parameter '{param}' expected value {new_value} but got {kwargs[param]} instead.")
    else:
        kwargs[param] = new_value


def load_pretrained(model: nn.Module, weights: WeightsEnum, progress: bool) -> None:
    """Load ``weights``' checkpoint into ``model`` strictly, through torchvision's loader and torch.hub's cache."""
    model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
