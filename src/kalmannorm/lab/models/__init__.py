"""Reference models, built with plain BatchNorm (convert them with :func:`kalmannorm.convert_norm`).

``build_model(name, num_classes, in_channels, **options)`` builds one by name; :data:`MODELS`
lists them, and ``"tv:<name>"`` builds any torchvision classification model (``tv:resnet18``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kalmannorm.lab.models.bn_inception import BNInception, bn_inception
from kalmannorm.lab.models.inception_cifar import InceptionCifar, inception_cifar
from kalmannorm.lab.models.resnet_cifar import (
    PreActBlock,
    PreActResNet,
    preact_resnet20,
    preact_resnet32,
    preact_resnet56,
    preact_resnet110,
)
from kalmannorm.lab.models.small_cnn import SmallCNN
from kalmannorm.lab.models.torchvision_models import (
    RepeatChannels,
    available_torchvision_models,
    torchvision_model,
)

ModelFactory = Callable[..., nn.Module]

#: Prefix of torchvision model names in :func:`build_model` (``"tv:resnet18"``).
TORCHVISION_PREFIX = "tv:"


def _preact(depth: int) -> ModelFactory:
    def build(num_classes: int, in_channels: int, **options) -> nn.Module:
        return PreActResNet(depth, num_classes, in_channels, **options)

    return build


def _resnet101(num_classes: int, in_channels: int, **options) -> nn.Module:
    return torchvision_model("resnet101", num_classes, in_channels, **options)


#: Model name -> factory ``(num_classes, in_channels, **options) -> nn.Module``.
MODELS: dict[str, ModelFactory] = {
    "small_cnn": lambda num_classes, in_channels, **options: SmallCNN(
        in_channels, num_classes, **options
    ),
    "preact_resnet20": _preact(20),
    "preact_resnet32": _preact(32),
    "preact_resnet56": _preact(56),
    "preact_resnet110": _preact(110),
    "inception_cifar": inception_cifar,  # the paper's CIFAR network (Section 4.4)
    "bn_inception": bn_inception,  # Inception-v2, the paper's ImageNet network
    "resnet101": _resnet101,  # torchvision's, the paper's other ImageNet network
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted (plus ``"tv:<torchvision name>"``)."""
    return sorted(MODELS)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **options) -> nn.Module:
    """Build the model registered as ``name`` (see :data:`MODELS`), with plain BatchNorm layers.

    ``"tv:<name>"`` builds torchvision's classification model ``<name>`` (``weights=None``).
    ``options`` go to the model's constructor (e.g. ``width=16`` for ``small_cnn``).

    Raises:
        ValueError: ``name`` is not registered; the message lists the valid names.
    """
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_model(
            name[len(TORCHVISION_PREFIX) :], num_classes, in_channels, **options
        )
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}, or "
            f"{TORCHVISION_PREFIX}<name> for any torchvision classification model"
        )
    return MODELS[name](num_classes, in_channels, **options)


__all__ = [
    "MODELS",
    "TORCHVISION_PREFIX",
    "BNInception",
    "InceptionCifar",
    "RepeatChannels",
    "available_torchvision_models",
    "bn_inception",
    "inception_cifar",
    "torchvision_model",
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
