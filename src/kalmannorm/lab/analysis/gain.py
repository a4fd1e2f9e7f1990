"""What a Kalman network learned: the gain q, the transition A and the noise R of each layer.

The gain q^k in [0, 1] (per channel) is how much layer k trusts its own batch statistics against
the prior predicted from layer k-1 (Eq. 5: mu^{k|k} = (1 - q) mu^{k|k-1} + q xbar): q = 1 is
BatchNorm, q = 0 ignores the batch. A snapshot records per layer

    q^k = sigmoid(gain_logit)  (or the fixed gain_value),   ||A^k||_F = sqrt(sum_ij A_ij^2),
    R^k = softplus(noise_raw),  mean R^k = (1/C_k) sum_c R^k_c

read from a model or straight from a state dict (so from checkpoints, without building the model).
A sequence of snapshots over training gives the plots: the distribution of q per layer, and
||A||_F and mean R against the training step. Layers without upstream (the first of a chain)
have no Kalman parameters and do not appear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as torch_f

from kalmannorm.lab.analysis.plotting import new_figure, save_figure


@dataclass
class LayerGain:
    """One layer's gain q (W,), ||A||_F and noise R (W,); ``None`` where the layer has none."""

    name: str
    gain: Tensor
    transition_norm: float | None
    noise: Tensor | None

    @property
    def noise_mean(self) -> float | None:
        return None if self.noise is None else float(self.noise.mean())

    def as_row(self) -> dict[str, Any]:
        q = self.gain.to(torch.float64)
        return {
            "layer": self.name,
            "q_mean": float(q.mean()),
            "q_std": float(q.std(correction=0)),
            "q_min": float(q.min()),
            "q_max": float(q.max()),
            "transition_norm": self.transition_norm,
            "noise_mean": self.noise_mean,
        }


#: A snapshot: layer name -> :class:`LayerGain`, in the model's order.
GainSnapshot = dict[str, LayerGain]
#: Snapshots over training: (step, snapshot) pairs.
GainHistory = Sequence[tuple[float, Mapping[str, LayerGain]]]


def _state_dict(source: nn.Module | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if "model" in source and isinstance(source["model"], Mapping):
        return source["model"]  # a checkpoint holding the model's state dict
    return source


def gain_snapshot(source: nn.Module | Mapping[str, Any]) -> GainSnapshot:
    """q, ||A||_F and R of every Kalman layer with an upstream, from a model, its state dict, or
    a checkpoint dict with the state dict under ``"model"``. Layer names are the key prefixes."""
    state = _state_dict(source)
    found: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("gain_logit", "gain_value", "transition", "noise_raw") and isinstance(
            value, Tensor
        ):
            found.setdefault(prefix, {})[leaf] = value.detach().to("cpu", torch.float64)
    snapshot: GainSnapshot = {}
    for name, tensors in found.items():
        if "gain_logit" in tensors:
            gain = torch.sigmoid(tensors["gain_logit"])
        elif "gain_value" in tensors:
            gain = tensors["gain_value"]
        else:
            continue
        transition = tensors.get("transition")
        noise = tensors.get("noise_raw")
        snapshot[name] = LayerGain(
            name,
            gain,
            None if transition is None else float(transition.norm()),  # Frobenius; diag: 2-norm
            None if noise is None else torch_f.softplus(noise),
        )
    return snapshot


def gain_snapshots_from_checkpoints(
    paths: Sequence[str | Path], *, step_key: str = "step"
) -> list[tuple[float, GainSnapshot]]:
    """Snapshots of checkpoint files (``torch.load(weights_only=True)``), each at the checkpoint's
    ``step_key`` entry (its position in ``paths`` when it has none), sorted by step."""
    history = []
    for index, path in enumerate(paths):
        state = torch.load(path, map_location="cpu", weights_only=True)
        step = state.get(step_key, index) if isinstance(state, Mapping) else index
        history.append((float(step), gain_snapshot(state)))
    return sorted(history, key=lambda item: item[0])


def gain_rows(snapshot: Mapping[str, LayerGain]) -> list[dict[str, Any]]:
    """One row per layer: q mean/std/min/max, ||A||_F and mean R."""
    return [layer.as_row() for layer in snapshot.values()]


def gain_history_rows(history: GainHistory) -> list[dict[str, Any]]:
    """:func:`gain_rows` of every snapshot, each row with its ``step``."""
    return [{"step": step, **row} for step, snapshot in history for row in gain_rows(snapshot)]


def write_gain_distribution_plot(
    snapshot: Mapping[str, LayerGain], path: str | Path, *, title: str | None = None
) -> Path:
    """Write a PNG: box plot of the gain q over each layer's channels, layers in order.

    Raises:
        ImportError: matplotlib is not installed.
    """
    if not snapshot:
        raise ValueError("the snapshot has no Kalman layer with a gain")
    names = list(snapshot)
    figure = new_figure(max(5.0, 0.35 * len(names) + 2.0), 4.0)
    axis = figure.subplots()
    axis.boxplot([snapshot[n].gain.numpy() for n in names], showfliers=True)
    axis.set_xticks(range(1, len(names) + 1), names, rotation=70, ha="right", fontsize=6)
    axis.set_ylim(-0.02, 1.02)
    axis.set_ylabel("gain q (weight on the layer's batch statistics)")
    axis.set_title(title or "learned gain q per layer")
    return save_figure(figure, path)


def write_gain_history_plot(
    history: GainHistory, path: str | Path, *, title: str | None = None
) -> Path:
    """Write a PNG with three panels against the training step, one line per layer: mean q,
    ||A||_F and mean R.

    Raises:
        ImportError: matplotlib is not installed.
    """
    if not history:
        raise ValueError("the history has no snapshot")
    names = list(dict.fromkeys(name for _, snapshot in history for name in snapshot))
    figure = new_figure(13.0, 3.8)
    axes = figure.subplots(1, 3)
    panels = (
        ("mean gain q", lambda layer: float(layer.gain.mean())),
        ("||A||_F", lambda layer: layer.transition_norm),
        ("mean noise R", lambda layer: layer.noise_mean),
    )
    for axis, (label, value) in zip(axes, panels):
        for index, name in enumerate(names):
            points = [
                (step, value(snapshot[name]))
                for step, snapshot in history
                if name in snapshot and value(snapshot[name]) is not None
            ]
            if not points:
                continue
            shade = index / max(1, len(names) - 1)
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="." if len(points) < 30 else None,
                color=(0.15 + 0.7 * shade, 0.3, 0.85 - 0.7 * shade),
                label=name,
                linewidth=1.0,
            )
        axis.set_xlabel("training step")
        axis.set_ylabel(label)
    if len(names) <= 12:
        axes[0].legend(fontsize=6)
    figure.suptitle(title or "Kalman parameters over training (blue: first layer, red: last)")
    return save_figure(figure, path)
