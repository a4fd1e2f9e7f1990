"""Optimizer parameter groups that give the Kalman parameters (q, R, A) their own settings.

The loss reaches a Kalman layer's gain q, noise R and transition A only through the statistics
it normalises with, so at the network's learning rate they hardly leave their initial values in
the runs measured here (docs/design/kalman-learning-rate.md). :func:`parameter_groups` lets them
learn at a multiple of the learning rate, with their own weight decay; at 100 times the learning
rate the paper's BKN gained 5-12 points at statistics batch 2 there in 300-step runs, 0.8-1.7
in 1000-step runs::

    groups = kalmannorm.parameter_groups(model, lr=0.1, weight_decay=5e-4, kalman_lr_scale=100)
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kalmannorm.layers.base import KalmanNormBase

#: The learned parameters of a Kalman layer besides BatchNorm's weight and bias.
KALMAN_PARAMETERS = ("gain_logit", "noise_raw", "transition")


def kalman_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The gain logits, noise parameters and transitions of every Kalman layer, each once."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, KalmanNormBase):
            for name in KALMAN_PARAMETERS:
                parameter = module._parameters.get(name)
                if parameter is not None:
                    found.setdefault(id(parameter), parameter)
    return list(found.values())


def parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    *,
    kalman_lr_scale: float = 1.0,
    kalman_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Two optimizer groups: every other parameter at ``lr`` and ``weight_decay``, then the
    Kalman parameters at ``lr * kalman_lr_scale`` and ``kalman_weight_decay`` (default:
    ``weight_decay``). The second group is left out when the model has no Kalman parameters;
    link the chain (``convert_norm`` / ``link_chain``) before building the groups, since linking
    creates them.
    """
    if not kalman_lr_scale > 0:
        raise ValueError(f"kalman_lr_scale must be positive, got {kalman_lr_scale}")
    kalman = kalman_parameters(model)
    kalman_ids = {id(p) for p in kalman}
    others = [p for p in model.parameters() if id(p) not in kalman_ids]
    groups: list[dict[str, Any]] = [{"params": others, "lr": lr, "weight_decay": weight_decay}]
    if kalman:
        decay = weight_decay if kalman_weight_decay is None else kalman_weight_decay
        groups.append({"params": kalman, "lr": lr * kalman_lr_scale, "weight_decay": decay})
    return groups
