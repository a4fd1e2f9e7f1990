"""A compare file's ``[search]`` table: every norm gets the same small grid on a held-out split
of the training set, and its best point is what the grid trains and tests (issue 14)::

    [search]
    holdout = 0.1                        # the fraction of the training set scored (default)
    train = {lr = [0.05, 0.1, 0.2]}      # training keys: every norm gets every value
    seeds = [0]                          # default: the grid's first seed
    [search.options]                     # a norm's own options, by the entry's label
    gn = {num_groups = [4, 8]}

Each (norm entry, statistics batch) of the grid, the baseline included, runs every point of the
product of ``train`` and its own ``options`` lists, with ``holdout`` (the test set is not read),
in ``<out>/search/``. The point with the highest final holdout accuracy with moving statistics
(mean over the search seeds; a failed run scores nothing; ties: the first point) is the one the
grid's runs use. ``search.md`` beside the summary has every point's holdout accuracy and the pick.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from kalmannorm.lab.train.config import config_keys, toml_value
from kalmannorm.lab.train.plan import ConfigError

SEARCH_KEYS = ("holdout", "train", "options", "seeds")

#: Training keys a search cannot vary: the grid sets them, or they define the search itself.
FIXED_KEYS = ("norm", "norm_options", "stat_batch_size", "seed", "out", "holdout", "test_subset")


@dataclass(frozen=True)
class Point:
    """One point of a search: training keys and norm options on top of a grid entry's."""

    train: dict = field(default_factory=dict, hash=False)
    options: dict = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        """``lr=0.1 num_groups=8`` (``default`` when nothing is set)."""
        values = {**self.train, **self.options}
        return " ".join(f"{k}={toml_value(v)}" for k, v in values.items()) or "default"


@dataclass
class SearchConfig:
    holdout: float = 0.1
    train: dict[str, list] = field(default_factory=dict)
    options: dict[str, dict[str, list]] = field(default_factory=dict)
    seeds: list[int] | None = None

    def points(self, label: str) -> list[Point]:
        """The product of the shared training values and the entry ``label``'s own options."""
        own = self.options.get(label, {})
        keys, lists = [*self.train, *own], [*self.train.values(), *own.values()]
        shared = len(self.train)
        return [
            Point(
                dict(zip(keys[:shared], values[:shared])), dict(zip(keys[shared:], values[shared:]))
            )
            for values in itertools.product(*lists)
        ]

    def describe(self) -> str:
        """What was searched, in one line (for the summary)."""
        shared = ", ".join(f"{k} in {_set(v)}" for k, v in self.train.items())
        own = "; ".join(
            f"{label}: " + ", ".join(f"{k} in {_set(v)}" for k, v in table.items())
            for label, table in self.options.items()
        )
        what = "; ".join(part for part in (shared and f"every norm: {shared}", own) if part)
        return (
            f"on a held-out {self.holdout:.0%} of the training set (never the test set), "
            f"{what or 'nothing varied'}; each norm's pick: its highest final holdout accuracy "
            f"(moving statistics)"
        )

    def to_dict(self) -> dict[str, Any]:
        table: dict[str, Any] = {"holdout": self.holdout, "train": self.train}
        table["options"] = self.options
        return {**table, "seeds": self.seeds} if self.seeds is not None else table


def _set(values: list) -> str:
    return "{" + ", ".join(toml_value(v) for v in values) + "}"


def parse_search(table: Any, labels: list[str]) -> SearchConfig:
    """A SearchConfig from a ``[search]`` table; ``labels``: the grid's norm entries."""
    if not isinstance(table, dict):
        raise ConfigError(f"[search] is a table (holdout, train, options, seeds), got {table!r}")
    unknown = sorted(set(table) - set(SEARCH_KEYS))
    if unknown:
        raise ConfigError(f"unknown [search] key(s) {unknown}; valid: {', '.join(SEARCH_KEYS)}")
    holdout = table.get("holdout", 0.1)
    if (
        not isinstance(holdout, (int, float))
        or isinstance(holdout, bool)
        or not (math.isfinite(holdout) and 0 < holdout < 1)
    ):
        raise ConfigError(f"[search] holdout is a fraction in (0, 1), got {holdout!r}")
    train = _lists(table.get("train", {}), "[search] train")
    fixed = sorted(set(train) & set(FIXED_KEYS))
    unknown = sorted(set(train) - set(config_keys()))
    if fixed or unknown:
        raise ConfigError(
            f"[search] train cannot vary {fixed or unknown}: "
            + ("the grid or the search sets them" if fixed else "not training keys")
        )
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError("[search] options is a table of norm-entry labels")
    strays = sorted(set(options) - set(labels))
    if strays:
        raise ConfigError(
            f"[search] options for {strays}: no such norm entry; the grid's labels are "
            f"{', '.join(labels)}"
        )
    own = {label: _lists(value, f"[search] options.{label}") for label, value in options.items()}
    seeds = table.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list)
        or not seeds
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)
    ):
        raise ConfigError(f"[search] seeds is a non-empty list of integers >= 0, got {seeds!r}")
    return SearchConfig(float(holdout), train, own, seeds)


def _lists(table: Any, where: str) -> dict[str, list]:
    """``{key: [values]}``: every value a non-empty list."""
    if not isinstance(table, dict) or any(not isinstance(v, list) or not v for v in table.values()):
        raise ConfigError(
            f"{where} maps keys to non-empty lists (e.g. lr = [0.05, 0.1]), got {table!r}"
        )
    return {k: list(v) for k, v in table.items()}


def pick(scores: list[list[float]]) -> int | None:
    """The index of the best point (highest mean score; ties: the first), None if none scored."""
    means = [statistics.fmean(s) if s else -math.inf for s in scores]
    best = max(range(len(means)), key=lambda i: (means[i], -i), default=None)
    return None if best is None or means[best] == -math.inf else best


def search_markdown(rows: list[tuple[str, str, Point, list[float], bool]], what: str) -> str:
    """``search.md``: each (entry, statistics batch, point)'s holdout accuracy, and the picks."""
    lines = [
        f"Search: {what}.",
        "",
        "| norm | stat batch | point | seeds | final holdout acc % (moving) | picked |",
        "|---|---|---|---|---|---|",
    ]
    for label, stat, point, values, picked in rows:
        accuracy = (
            f"{100 * statistics.fmean(values):.2f}"
            + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")
            if values
            else "failed"
        )
        lines.append(
            f"| {label} | {stat} | {point.name} | {len(values)} | {accuracy} | "
            f"{'**yes**' if picked else ''} |"
        )
    return "\n".join(lines) + "\n"
