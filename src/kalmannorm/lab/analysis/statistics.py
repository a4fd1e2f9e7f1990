"""Per-layer, per-group statistics of a whole data set, and the population statistics beside them.

:func:`collect_statistics` forwards a data set through a model in statistics groups of s
consecutive samples, normalising as in training (see :mod:`kalmannorm.lab.train.batch_mode`: eval
mode, every norm on its group statistics, nothing updated), and records for every normalization
layer k and group g (W units: channels; channel groups for GKN, whose "groups" are samples):

    batch statistics     xbar_g = (1/m) sum_{i in g} x_i,  S_g = (1/m) sum_{i in g} (x_i - xbar_g)^2
    used statistics      (mu_g, v_g) = (xbar_g, S_g) for BatchNorm;
                         the posterior (mu^{k|k}_g, diag Sigma^{k|k}_g) for BKN/GKN
    gain                 q_g actually applied (Kalman layers)

with m = s * prod(spatial) values per unit, and, over the same inputs of the same layer (same
weights, same forward), the population statistics

    mu_pop = (1/M) sum_i x_i,   sigma^2_pop = (1/M) sum_i (x_i - mu_pop)^2     (M: all values)

accumulated in float64 with the pairwise update of Chan et al.: for a new batch b with n_b values,
mean mu_b and sum of squared deviations M2_b, delta = mu_b - mu,
mu <- mu + delta n_b / (n + n_b),  M2 <- M2 + M2_b + delta^2 n n_b / (n + n_b).
The model's moving statistics and every other buffer are left as they were.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kalmannorm.lab.analysis.batches import DataSource, iterate_batches, model_device
from kalmannorm.lab.errors import UserError
from kalmannorm.lab.train.batch_mode import (
    GKN,
    GroupStatistics,
    NormLayer,
    batch_statistics_mode,
    find_norm_layers,
    whole_groups,
)


class PopulationMoments:
    """Mean and biased variance per unit over every value seen, accumulated in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, values: Tensor) -> None:
        """Add ``values`` of shape (W, n): n new values of each of W units."""
        values = values.to(torch.float64)
        n = values.shape[1]
        if n == 0:
            return
        mean = values.mean(1)
        m2 = (values - mean.unsqueeze(1)).square().sum(1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> Tensor:
        """sigma^2_pop = M2 / M (biased: the population over all values)."""
        if self.m2 is None:
            raise ValueError("no values were accumulated")
        return self.m2 / self.count


def unit_values(x: Tensor, layer: NormLayer) -> Tensor:
    """A layer input (N, C, *spatial) as (W, values): per channel, or per channel group (GKN)."""
    if layer.kind == GKN:
        groups = layer.module.num_groups
        x = x.unflatten(1, (groups, x.shape[1] // groups))
    return x.movedim(1, 0).reshape(x.shape[1], -1)


@dataclass
class LayerStatistics:
    """What one normalization layer saw over a data set (see the module docstring).

    Group statistics are (G, W) tensors (G groups over the whole data set, in data order), the
    population statistics and moving statistics (W,). ``running_*`` are ``None`` for layers without
    moving statistics (GKN). ``count`` is m, the values per group and unit (of the last batch).
    """

    name: str
    kind: str
    units: str
    group_size: int | None
    count: int
    samples: int
    eps: float
    batch_mean: Tensor
    batch_var: Tensor
    mean: Tensor
    var: Tensor
    gain: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    population_mean: Tensor
    population_var: Tensor

    @property
    def groups(self) -> int:
        return self.mean.shape[0]

    @property
    def width(self) -> int:
        return self.mean.shape[1]


class _Collector:
    def __init__(self, selected: Collection[str] | None) -> None:
        self.selected = selected
        self.groups: dict[str, list[GroupStatistics]] = {}
        self.population: dict[str, PopulationMoments] = {}
        self.samples: dict[str, int] = {}
        self.layers: dict[str, NormLayer] = {}

    def __call__(self, layer: NormLayer, x: Tensor, stats: GroupStatistics) -> None:
        if self.selected is not None and layer.name not in self.selected:
            return
        name = layer.name
        if name not in self.layers:
            self.layers[name] = layer
            self.groups[name] = []
            self.population[name] = PopulationMoments()
            self.samples[name] = 0
        copies: dict[int, Tensor] = {}  # BatchNorm's used statistics are its batch statistics

        def to_cpu(t: object) -> object:
            if not isinstance(t, Tensor):
                return t
            if id(t) not in copies:
                copies[id(t)] = t.detach().to("cpu", copy=True)
            return copies[id(t)]

        cpu = GroupStatistics(*(to_cpu(t) for t in stats))
        self.groups[name].append(cpu)
        self.population[name].update(unit_values(x.detach(), layer))
        self.samples[name] += x.shape[0]

    def result(self) -> dict[str, LayerStatistics]:
        out = {}
        for name, layer in self.layers.items():
            parts = self.groups[name]
            module = layer.module
            running_mean = getattr(module, "running_mean", None)
            running_var = getattr(module, "running_var", None)
            gains = [p.gain for p in parts]
            population = self.population[name]
            out[name] = LayerStatistics(
                name=name,
                kind=layer.kind,
                units=layer.units,
                group_size=layer.group_size,
                count=parts[-1].count,
                samples=self.samples[name],
                eps=float(getattr(module, "eps", 1e-5)),
                batch_mean=torch.cat([p.batch_mean for p in parts]),
                batch_var=torch.cat([p.batch_var for p in parts]),
                mean=torch.cat([p.mean for p in parts]),
                var=torch.cat([p.var for p in parts]),
                gain=None if any(g is None for g in gains) else torch.cat(gains),
                running_mean=None
                if not isinstance(running_mean, Tensor)
                else running_mean.detach().to("cpu", copy=True),
                running_var=None
                if not isinstance(running_var, Tensor)
                else running_var.detach().to("cpu", copy=True),
                population_mean=population.mean,
                population_var=population.var,
            )
        return out


def collect_statistics(
    model: nn.Module,
    data: DataSource,
    *,
    stat_batch_size: int | None = None,
    batch_size: int = 256,
    max_samples: int | None = None,
    layers: Collection[str] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, LayerStatistics]:
    """Forward ``data`` through ``model`` in statistics groups; per-layer group and population
    statistics, by layer name (in execution order).

    Args:
        model: a model with BatchNorm-like, BKN or GKN layers; not modified.
        data: inputs (see :mod:`kalmannorm.lab.analysis.batches`); labels are ignored.
        stat_batch_size: samples per statistics group for every layer; ``None``: each layer's own
            (a BKN's or ghost BN's ``stat_batch_size``; a plain BatchNorm's whole forward batch).
        batch_size: samples per forward pass (rounded down to a multiple of the group sizes;
            with a layer whose group is the whole batch, only full batches are used).
        max_samples: read at most this many samples (whole groups).
        layers: names of the layers to record (default: all).
        device: where to run (default: the model's device).
    """
    found = find_norm_layers(model, stat_batch_size)
    if not found:
        raise AnalysisInputError("the model has no BatchNorm-like, BKN or GKN layer to analyse")
    if layers is not None:
        unknown = set(layers) - {layer.name for layer in found}
        if unknown:
            raise AnalysisInputError(
                f"no normalization layer named {sorted(unknown)}; the model's are "
                f"{[layer.name for layer in found]}"
            )
    multiple = whole_groups(found, batch_size)
    device = model_device(model) if device is None else torch.device(device)
    collector = _Collector(layers)
    with torch.no_grad(), batch_statistics_mode(model, stat_batch_size, collector):
        for inputs, _ in iterate_batches(
            data, batch_size, multiple_of=multiple, max_samples=max_samples
        ):
            model(inputs.to(device))
    if not collector.layers:
        raise AnalysisInputError(
            f"no batch reached the normalization layers: the data (max_samples={max_samples}) "
            f"holds fewer samples than one forward batch of whole statistics groups "
            f"({multiple}); use more samples (--max-samples) or smaller groups"
        )
    return collector.result()


class AnalysisInputError(UserError, ValueError):
    """A model or data set the analysis cannot measure (no norm layer, too few samples)."""
