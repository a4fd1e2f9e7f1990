"""A held-out split of the training set: the evaluation set of hyper-parameter searches.

``TrainConfig.holdout = 0.1`` keeps 10 % of the training images out of training and evaluates
on them instead of the test set, which the run then never reads (issue 14: every norm gets the
same small search on a held-out split of the training set, not the test set). The split is a
fixed permutation of the training set, independent of the run's seed, so every run of a search,
whatever its norm or seed, trains on the same images and is scored on the same ones.
Normalisation keeps the data set's per-channel mean and standard deviation (of the whole
training set: no labels, and no test image, are involved).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

#: What a run evaluates on: ``summary.json``'s ``eval_set``.
TEST, HOLDOUT = "test", "holdout"

#: The split's generator seed: the same for every run (not the run's seed).
HOLDOUT_SEED = 14

Batch = tuple[Tensor, Tensor]


def holdout_indices(n: int, fraction: float) -> tuple[Tensor, Tensor]:
    """``(kept, held_out)``: ascending positions in ``range(n)``, disjoint, together all of it.

    ``round(fraction * n)`` positions (at least 1, at most ``n - 1``) are held out: the last
    ones of a permutation drawn from :data:`HOLDOUT_SEED`, so the same for every run.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {fraction!r}")
    if n < 2:
        raise ValueError(f"a holdout needs at least 2 training images, got {n}")
    size = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return order[: n - size].sort().values, order[n - size :].sort().values


class HoldoutData:
    """A data set whose training images are cut into a training part and a held-out part that
    replaces the test set (``test_batches``); its own test set is never read.

    Works over any data set the training loop reads (in-memory tensors or image folders): it
    only maps training positions and draws the held-out images, without augmentation, through
    the underlying ``train_batches``.
    """

    eval_set = HOLDOUT

    def __init__(self, data, fraction: float) -> None:
        self.data = data
        self.fraction = fraction
        self.train_indices, self.holdout_indices = holdout_indices(data.train_size, fraction)
        self.name = data.name
        self.num_classes = data.num_classes
        self.in_channels = data.in_channels
        self.image_size = data.image_size

    @property
    def train_size(self) -> int:
        return len(self.train_indices)

    @property
    def test_size(self) -> int:
        """The evaluation set's size: the held-out images."""
        return len(self.holdout_indices)

    def train_batches(
        self, batches: Iterable[tuple[Tensor, int]], part: slice | Tensor, augment: bool = True
    ) -> Iterator[Batch]:
        """As the data set's ``train_batches``, positions counted in the training part."""
        mapped = ((self.train_indices[indices], seed) for indices, seed in batches)
        return self.data.train_batches(mapped, part, augment)

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        """The held-out images in order, unaugmented, in batches of ``batch_size``."""
        return self._in_order(self.holdout_indices, batch_size)

    def train_batches_in_order(self, batch_size: int) -> Iterator[Batch]:
        """The training part in order, unaugmented (what the analyses forward)."""
        return self._in_order(self.train_indices, batch_size)

    def _in_order(self, indices: Tensor, batch_size: int) -> Iterator[Batch]:
        chunks = [(indices[s : s + batch_size], 0) for s in range(0, len(indices), batch_size)]
        return self.data.train_batches(chunks, slice(None), False)
