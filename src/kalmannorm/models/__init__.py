"""Reference models, built with plain BatchNorm (convert them with :func:`kalmannorm.convert_norm`).

``build_model(name, num_classes, in_channels)`` builds one by name; :data:`MODELS` lists them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kalmannorm.models.resnet_cifar import (
    PreActBlock,
    PreActResNet,
    preact_resnet20,
    preact_resnet32,
    preact_resnet56,
    preact_resnet110,
)
from kalmannorm.models.small_cnn import SmallCNN

ModelFactory = Callable[[int, int], nn.Module]

#: Model name -> factory ``(num_classes, in_channels) -> nn.Module``.
MODELS: dict[str, ModelFactory] = {
    "small_cnn": lambda num_classes, in_channels: SmallCNN(in_channels, num_classes),
    "preact_resnet20": preact_resnet20,
    "preact_resnet32": preact_resnet32,
    "preact_resnet56": preact_resnet56,
    "preact_resnet110": preact_resnet110,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(MODELS)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build the model registered as ``name`` (see :data:`MODELS`), with plain BatchNorm layers.

    Raises:
        ValueError: ``name`` is not registered; the message lists the valid names.
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        )
    return MODELS[name](num_classes, in_channels)


__all__ = [
    "MODELS",
    "PreActBlock",
    "PreActResNet",
    "SmallCNN",
    "available_models",
    "build_model",
    "preact_resnet20",
    "preact_resnet32",
    "preact_resnet56",
    "preact_resnet110",
]
