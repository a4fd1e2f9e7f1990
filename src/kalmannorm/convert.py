"""Norms by name: the registry, ``build_norm`` and the recursive ``convert_norm`` swap.

Every norm the library offers is registered here under a short name ("bkn", "gkn", ...), built
from the BatchNorm layer it replaces, so the converter, the harness and the command line all
create layers the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kalmannorm.chain import KalmanChain, link_chain
from kalmannorm.layers import (
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    GroupKalmanNorm,
    KalmanNormBase,
    KalmanStatistics,
)


@dataclass(frozen=True)
class SourceNorm:
    """What a builder needs to know about the BatchNorm layer it replaces."""

    num_features: int
    dims: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    device: torch.device
    dtype: torch.dtype


Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormSpec:
    name: str
    build: Builder
    description: str


_REGISTRY: dict[str, NormSpec] = {}


def register_norm(name: str, description: str) -> Callable[[Builder], Builder]:
    """Register ``build(source: SourceNorm, **options) -> nn.Module`` under ``name``."""

    def decorate(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"a norm named {name!r} is already registered")
        _REGISTRY[name] = NormSpec(name, build, description)
        return build

    return decorate


def available_norms() -> dict[str, str]:
    """Registered norm names and their one-line descriptions."""
    return {name: spec.description for name, spec in sorted(_REGISTRY.items())}


def _spec(name: str) -> NormSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; registered norms: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_norm(name: str, num_features: int, dims: int = 2, **options) -> nn.Module:
    """Build the norm ``name`` for ``num_features`` channels of ``dims``-d data (1, 2 or 3)."""
    source = SourceNorm(
        num_features=num_features,
        dims=dims,
        eps=options.pop("eps", 1e-5),
        momentum=options.pop("momentum", 0.1),
        affine=options.pop("affine", True),
        track_running_stats=options.pop("track_running_stats", True),
        device=options.pop("device", torch.device("cpu")),
        dtype=options.pop("dtype", torch.get_default_dtype()),
    )
    return _spec(name).build(source, **options)


# -- the registered norms ---------------------------------------------------------------------

_BKN_BY_DIMS = {1: BatchKalmanNorm1d, 2: BatchKalmanNorm2d, 3: BatchKalmanNorm3d}


@register_norm(
    "bkn", "Batch Kalman Normalization (prior='learned' as in the paper, or 'propagate')"
)
def _build_bkn(source: SourceNorm, **options) -> nn.Module:
    return _BKN_BY_DIMS[source.dims](
        source.num_features,
        source.eps,
        source.momentum,
        source.affine,
        source.track_running_stats,
        device=source.device,
        dtype=source.dtype,
        **options,
    )


def default_num_groups(num_channels: int, most: int = 32) -> int:
    """The largest group count <= ``most`` that divides ``num_channels``."""
    return next(g for g in range(min(most, num_channels), 0, -1) if num_channels % g == 0)


@register_norm("gkn", "Group Kalman Normalization (per-sample group statistics, Kalman-filtered)")
def _build_gkn(source: SourceNorm, num_groups: int | None = None, **options) -> nn.Module:
    groups = default_num_groups(source.num_features) if num_groups is None else num_groups
    return GroupKalmanNorm(
        groups,
        source.num_features,
        source.eps,
        source.affine,
        device=source.device,
        dtype=source.dtype,
        **options,
    )


# -- converting a model -----------------------------------------------------------------------

_DIMS_BY_CLASS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _is_frozen_batchnorm(module: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d (detected by name: torchvision is optional)."""
    return type(module).__name__ == "FrozenBatchNorm2d" and hasattr(module, "running_var")


def _describe_source(module: nn.Module) -> SourceNorm | None:
    if _is_frozen_batchnorm(module):
        reference = module.running_var
        return SourceNorm(
            num_features=reference.shape[0],
            dims=2,
            eps=float(getattr(module, "eps", 1e-5)),
            momentum=0.1,
            affine=True,
            track_running_stats=True,
            device=reference.device,
            dtype=reference.dtype,
        )
    dims = next((d for cls, d in _DIMS_BY_CLASS.items() if isinstance(module, cls)), None)
    if dims is None:
        return None
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = module.running_var if module.running_var is not None else torch.empty(0)
    return SourceNorm(
        num_features=module.num_features,
        dims=dims,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device=tensor.device,
        dtype=tensor.dtype,
    )


def _copy_state(source: nn.Module, target: nn.Module) -> None:
    """Copy BatchNorm's weight, bias and running statistics into ``target`` where both have them."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            src, dst = getattr(source, name, None), getattr(target, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                if src.shape == dst.shape:
                    dst.copy_(src)
                if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
                    dst.requires_grad_(src.requires_grad)


def _swap(
    module: nn.Module, spec: NormSpec, options: dict, done: dict[int, nn.Module]
) -> nn.Module:
    """Replace BatchNorms below ``module``; a BatchNorm used in several places stays shared."""
    if id(module) in done:
        return done[id(module)]
    source = _describe_source(module)
    if source is not None:
        new = spec.build(source, **options)
        _copy_state(module, new)
        new.train(module.training)
        done[id(module)] = new
        return new
    done[id(module)] = module
    for name, child in list(module._modules.items()):  # every slot, shared modules included
        if child is None:
            continue
        replaced = _swap(child, spec, options, done)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def convert_norm(
    module: nn.Module, name: str = "bkn", *, example_input: object = None, **options
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d and torchvision FrozenBatchNorm2d in ``module`` by ``name``.

    Weight, bias and running statistics are copied (FrozenBatchNorm2d becomes trainable), the
    Kalman layers are linked into one chain in execution order (traced from ``example_input`` when
    given, else module registration order; see :func:`kalmannorm.link_chain`), and the module is
    returned, modified in place like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`
    (a BatchNorm passed as ``module`` itself is returned replaced). ``options`` go to the norm's
    constructor (e.g. ``stat_batch_size=2``).
    """
    converted = _swap(module, _spec(name), options, {})
    if any(isinstance(m, KalmanNormBase) for m in converted.modules()):
        link_chain(converted, example_input)
    return converted


def find_chain(model: nn.Module) -> KalmanChain | None:
    """The chain the Kalman layers of ``model`` are linked in, if any."""
    return next((m.chain for m in model.modules() if isinstance(m, KalmanNormBase)), None)


def set_eval_statistics(model: nn.Module, mode: str) -> None:
    """Evaluate every BKN layer with ``"moving"`` or ``"batch"`` statistics (Table 3's options)."""
    from kalmannorm.layers.batch_kalman import EVAL_STATISTICS, BatchKalmanNorm

    if mode not in EVAL_STATISTICS:
        raise ValueError(f"mode must be one of {EVAL_STATISTICS}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, BatchKalmanNorm):
            m.eval_statistics = mode


def kalman_statistics(model: nn.Module) -> dict[str, KalmanStatistics]:
    """The statistics each Kalman layer of ``model`` estimated in its last forward, by name."""
    return {
        name: m.last_statistics
        for name, m in model.named_modules()
        if isinstance(m, KalmanNormBase) and m.last_statistics is not None
    }
