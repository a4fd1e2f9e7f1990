"""Test accuracy with moving statistics and with batch statistics (the paper's Table 3).

*Moving*: the model in eval mode, as deployed. *Batch*: each test batch normalised with its own
statistics, in the statistics groups each layer used in training, through
:func:`~kalmannorm.lab.train.batch_mode.batch_statistics_mode` (the one implementation; the
analyses use it too): BKN layers use their per-group posterior (inference option 'A');
BatchNorm-like layers (plain BatchNorm, ghost BN, BRN, CBN, FrozenBatchNorm2d) are BatchNorm per
group, a plain BatchNorm's group being the whole forward batch, i.e. the training forward pass;
batch-independent norms (GroupNorm, LayerNorm, GKN, ...) compute the same thing in both columns,
so a model with nothing batch-dependent scores the same in both.

The model is left unchanged: buffers, modes and settings are restored.

*Precise* (``precise_bn_batches``): a copy of the model whose moving statistics
:func:`kalmannorm.update_bn` recomputes over that many training batches (PreciseBN), evaluated
like *moving*.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from kalmannorm import update_bn
from kalmannorm.lab.accuracy import count_correct
from kalmannorm.lab.train.batch_mode import (
    GKN,
    batch_statistics_mode,
    find_norm_layers,
    moving_statistics_mode,
)
from kalmannorm.lab.train.distributed import Distributed, all_reduce_sum


@torch.no_grad()
def _accuracy(
    model: nn.Module,
    data,
    batch_size: int,
    dist: Distributed,
    device: torch.device,
    whole: int = 1,
) -> tuple[float, int]:
    """Correct fraction over the test set, in batches of ``batch_size``, each cut to a multiple
    of ``whole`` (the samples of an incomplete last group are left out); batches are shared
    round-robin among processes. NaN when no sample could be scored."""
    mine = (
        (x[: len(y) - len(y) % whole], y[: len(y) - len(y) % whole])
        for index, (x, y) in enumerate(data.test_batches(batch_size))
        if len(y) >= whole and index % dist.world_size == dist.rank
    )
    correct, count = all_reduce_sum(list(count_correct(model, mine, device)), dist, device)
    return (correct / count if count else float("nan")), int(count)


def evaluate(
    model: nn.Module,
    data,
    *,
    stat_batch_size: int,
    eval_batch_size: int,
    dist: Distributed,
    device: torch.device,
) -> dict[str, float]:
    """``test_acc_moving`` and ``test_acc_batch`` of ``model`` (left in eval mode).

    Args:
        model: the bare model (not the DDP wrapper).
        data: the data set (``test_batches``).
        stat_batch_size: the training statistics group. Layers that group by themselves get
            test batches of the largest multiple of it up to ``eval_batch_size``; a model with
            layers that normalise the whole forward batch (plain BatchNorm) gets test batches of
            exactly this size, which for them is the training forward pass. The samples of an
            incomplete last group are left out, so the evaluated images depend only on these
            two sizes, never on the number of processes. A model without batch-dependent layers
            scores the same in both columns.
        eval_batch_size: test batch for the moving-statistics evaluation.
    """
    model.eval()
    with moving_statistics_mode(model):
        moving, _ = _accuracy(model, data, eval_batch_size, dist, device)
    layers = [layer for layer in find_norm_layers(model) if layer.kind != GKN]
    if not layers:  # nothing depends on the batch
        return {"test_acc_moving": moving, "test_acc_batch": moving}
    with batch_statistics_mode(model):
        if any(layer.group_size is None for layer in layers):  # the forward batch is the group
            batch, _ = _accuracy(model, data, stat_batch_size, dist, device, stat_batch_size)
        else:  # layers group by themselves: any whole number of groups
            size = max(stat_batch_size, eval_batch_size // stat_batch_size * stat_batch_size)
            batch, _ = _accuracy(model, data, size, dist, device, stat_batch_size)
    return {"test_acc_moving": moving, "test_acc_batch": batch}


def precise_accuracy(
    model: nn.Module,
    data,
    batches: Iterable[torch.Tensor],
    *,
    eval_batch_size: int,
    dist: Distributed,
    device: torch.device,
) -> float:
    """``test_acc_precise``: the moving-statistics accuracy of a copy of ``model`` whose moving
    statistics :func:`kalmannorm.update_bn` recomputed over ``batches`` (this process's training
    inputs; the sums are all-reduced over processes). ``model`` itself is unchanged."""
    precise = copy.deepcopy(model)
    update_bn(batches, precise, device=device)
    precise.eval()
    with moving_statistics_mode(precise):
        accuracy, _ = _accuracy(precise, data, eval_batch_size, dist, device)
    return accuracy
