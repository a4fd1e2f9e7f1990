"""torchvision classification models by name (``tv:resnet18``), ResNet-101 among them.

Built with ``weights=None`` and the requested number of classes. For inputs with other than 3
channels (greyscale data) a :class:`RepeatChannels` in front copies the channels to three, so
the model is unchanged; convert its BatchNorms with :func:`kalmannorm.convert_norm` as usual.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["RepeatChannels", "available_torchvision_models", "torchvision_model"]


class RepeatChannels(nn.Module):
    """Repeat (or cut) input channels to ``channels`` (greyscale -> RGB)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        repeats = -(-self.channels // x.shape[1])
        return x.repeat(1, repeats, 1, 1)[:, : self.channels]


def _torchvision():
    try:
        import torchvision
    except ImportError as error:
        raise ImportError("torchvision models need torchvision: pip install torchvision") from error
    return torchvision


def available_torchvision_models() -> list[str]:
    """torchvision's classification model names (empty without torchvision)."""
    try:
        torchvision = _torchvision()
    except ImportError:
        return []
    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_model(
    name: str, num_classes: int = 1000, in_channels: int = 3, **options
) -> nn.Module:
    """torchvision's classification model ``name``, untrained, for ``num_classes`` classes."""
    torchvision = _torchvision()
    names = available_torchvision_models()
    if name not in names:
        raise ValueError(
            f"unknown torchvision model {name!r}; torchvision classification models: "
            f"{', '.join(names)}"
        )
    options.setdefault("weights", None)
    if name.startswith("inception") or name == "googlenet":
        options.setdefault("aux_logits", False)
        options.setdefault("init_weights", True)
    model = torchvision.models.get_model(name, num_classes=num_classes, **options)
    return model if in_channels == 3 else nn.Sequential(RepeatChannels(3), model)
