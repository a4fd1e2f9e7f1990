"""Counting correct top-1 predictions: the one accuracy loop of the lab (training evaluation,
the eval-mode analyses and the demo each pass it their own batches)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def count_correct(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> tuple[int, int]:
    """(correct, scored): the samples of ``batches`` whose arg-max logit of ``model`` (as it is
    set up: train or eval, statistics mode) is the label, and how many were scored."""
    correct = count = 0
    for inputs, labels in batches:
        logits = model(inputs.to(device, non_blocking=True))
        correct += int((logits.argmax(1) == labels.to(device)).sum())
        count += len(labels)
    return correct, count
