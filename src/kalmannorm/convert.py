"""Norms by name: the registry, ``build_norm`` and the recursive ``convert_norm`` swap.

Every norm the library offers is registered here under a short name ("bkn", "gkn", ...), built
from the BatchNorm layer it replaces, so the converter, the harness and the command line all
create layers the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kalmannorm.chain import KalmanChain, link_chain
from kalmannorm.layers import (
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    ChannelLayerNorm,
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    EvoNormS0,
    FilterResponseNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GroupKalmanNorm,
    KalmanNormBase,
    KalmanStatistics,
    link_cross_iteration,
)
from kalmannorm.layers.filter_response import DEFAULT_EPS as FRN_DEFAULT_EPS


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
    """Build the norm ``name`` for ``num_features`` channels of ``dims``-d data (1, 2 or 3).

    A norm whose builder takes its own ``eps`` (FRN: the paper's 1e-6 rather than BatchNorm's)
    receives a given ``eps`` as an option; the others take it as BatchNorm's eps.
    """
    spec = _spec(name)
    takes_eps = "eps" in inspect.signature(spec.build).parameters
    source = SourceNorm(
        num_features=num_features,
        dims=dims,
        eps=options.get("eps", 1e-5) if takes_eps else options.pop("eps", 1e-5),
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


#: Fewest channels a default group holds ("gn", "gkn"). The GN paper (Wu & He 2018, Table 3)
#: finds a fixed 8 or 16 channels per group about as good as 32 groups, fewer channels worse, and
#: 1 (InstanceNorm) far worse; 8 keeps 2 groups on a 16-channel layer (1 group is LayerNorm).
MIN_CHANNELS_PER_GROUP = 8


def default_num_groups(
    num_channels: int, most: int = 32, min_channels: int = MIN_CHANNELS_PER_GROUP
) -> int:
    """The largest group count G <= ``most`` that divides ``num_channels`` with at least
    ``min_channels`` channels per group (G = 1 when the layer has fewer channels).

    ``min_channels=1`` is the former rule (the largest divisor <= 32: InstanceNorm on a layer of
    at most 32 channels).
    """
    if min_channels < 1:
        raise ValueError(f"min_channels_per_group must be a positive integer, got {min_channels}")
    limit = max(1, min(most, num_channels // min_channels))
    return next(g for g in range(limit, 0, -1) if num_channels % g == 0)


@register_norm(
    "gkn",
    "Group Kalman Normalization (per-sample group statistics, Kalman-filtered); groups as gn",
)
def _build_gkn(
    source: SourceNorm,
    num_groups: int | None = None,
    min_channels_per_group: int = MIN_CHANNELS_PER_GROUP,
    **options,
) -> nn.Module:
    groups = _group_count(source.num_features, num_groups, "gkn", min_channels_per_group)
    return GroupKalmanNorm(
        groups,
        source.num_features,
        source.eps,
        source.affine,
        device=source.device,
        dtype=source.dtype,
        **options,
    )


def _batch_norm_kwargs(source: SourceNorm) -> dict:
    """BatchNorm's constructor arguments of the layer being replaced."""
    return {
        "num_features": source.num_features,
        "eps": source.eps,
        "momentum": source.momentum,
        "affine": source.affine,
        "track_running_stats": source.track_running_stats,
        "device": source.device,
        "dtype": source.dtype,
    }


_GHOST_BY_DIMS = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}
_BRN_BY_DIMS = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
_CBN_BY_DIMS = {
    1: CrossIterationBatchNorm1d,
    2: CrossIterationBatchNorm2d,
    3: CrossIterationBatchNorm3d,
}
_INSTANCE_BY_DIMS = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


@register_norm("bn", "BatchNorm; with stat_batch_size, ghost BatchNorm (statistics per group)")
def _build_bn(source: SourceNorm, **options) -> nn.Module:
    return _GHOST_BY_DIMS[source.dims](**_batch_norm_kwargs(source), **options)


@register_norm("brn", "Batch Renormalization (Ioffe 2017), r_max/d_max relaxed on a schedule")
def _build_brn(source: SourceNorm, **options) -> nn.Module:
    return _BRN_BY_DIMS[source.dims](**_batch_norm_kwargs(source), **options)


@register_norm(
    "cbn", "Cross-Iteration BatchNorm (Yao et al. 2020): Taylor-compensated window of iterations"
)
def _build_cbn(source: SourceNorm, **options) -> nn.Module:
    return _CBN_BY_DIMS[source.dims](**_batch_norm_kwargs(source), **options)


@register_norm(
    "mabn", "Moving Average BatchNorm (Yan et al. 2020): second moment, SMA forward and backward"
)
def _build_mabn(source: SourceNorm, **options) -> nn.Module:
    from kalmannorm.layers import moving_average_batch as mabn

    by_dims = {
        1: mabn.MovingAverageBatchNorm1d,
        2: mabn.MovingAverageBatchNorm2d,
        3: mabn.MovingAverageBatchNorm3d,
    }
    # momentum may be given (the paper's is 0.02): it overrides the replaced BatchNorm's
    return by_dims[source.dims](**{**_batch_norm_kwargs(source), **options})


def _group_count(num_channels: int, num_groups: int | None, name: str, min_channels: int) -> int:
    if num_groups is None:
        return default_num_groups(num_channels, min_channels=min_channels)
    if num_groups < 1 or num_channels % num_groups != 0:
        raise ValueError(
            f"{name}: num_groups={num_groups} does not divide the {num_channels} channels of a "
            f"BatchNorm layer being replaced; pass a divisor of every layer's channel count, or "
            f"leave num_groups unset (per layer: the largest divisor <= 32 leaving "
            f"min_channels_per_group={min_channels} channels per group)"
        )
    return num_groups


# Batch-free norms: statistics never involve other samples, so they take no ``stat_batch_size``
# (passing one is a TypeError naming it, which is how a harness tells the two kinds apart).


@register_norm(
    "gn", "GroupNorm (torch); default groups: <= 32, >= 8 channels each (min_channels_per_group)"
)
def _build_gn(
    source: SourceNorm,
    num_groups: int | None = None,
    min_channels_per_group: int = MIN_CHANNELS_PER_GROUP,
) -> nn.Module:
    return nn.GroupNorm(
        _group_count(source.num_features, num_groups, "gn", min_channels_per_group),
        source.num_features,
        source.eps,
        source.affine,
        device=source.device,
        dtype=source.dtype,
    )


@register_norm("ln", "LayerNorm over channels per position (spatial=True: over C, H, W)")
def _build_ln(source: SourceNorm, spatial: bool = False) -> nn.Module:
    if spatial:
        return nn.GroupNorm(
            1, source.num_features, source.eps, source.affine, source.device, source.dtype
        )
    return ChannelLayerNorm(
        source.num_features, source.eps, source.affine, device=source.device, dtype=source.dtype
    )


@register_norm("in", "InstanceNorm (torch), affine as the BatchNorm, no running statistics")
def _build_in(source: SourceNorm) -> nn.Module:
    return _INSTANCE_BY_DIMS[source.dims](
        source.num_features,
        source.eps,
        affine=source.affine,
        track_running_stats=False,
        device=source.device,
        dtype=source.dtype,
    )


@register_norm("frn", "Filter Response Normalization + TLU (Singh & Krishnan 2020)")
def _build_frn(source: SourceNorm, eps: float = FRN_DEFAULT_EPS, **options) -> nn.Module:
    # The paper's eps (1e-6), not the replaced BatchNorm's; convert_norm(..., eps=) overrides it.
    return FilterResponseNorm(
        source.num_features,
        eps,
        source.affine,
        device=source.device,
        dtype=source.dtype,
        **options,
    )


@register_norm("evonorm_s0", "EvoNorm-S0 (Liu et al. 2020): x sigmoid(v x) / group std")
def _build_evonorm_s0(
    source: SourceNorm,
    num_groups: int | None = None,
    min_channels_per_group: int = 1,  # the paper's 32 groups where they divide
    **options,
) -> nn.Module:
    return EvoNormS0(
        _group_count(source.num_features, num_groups, "evonorm_s0", min_channels_per_group),
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
    module: nn.Module,
    name: str = "bkn",
    *,
    example_input: object = None,
    flow: str | None = None,
    source: str = "batch",
    **options,
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d and torchvision FrozenBatchNorm2d in ``module`` by ``name``.

    Weight, bias and running statistics are copied (FrozenBatchNorm2d becomes trainable), the
    Kalman layers are linked into one chain (``flow`` and ``source`` as in
    :func:`kalmannorm.link_chain`: by default each layer's prior follows the data flow, traced on
    ``example_input`` when given, else on the model's first forward call), Cross-Iteration BN
    layers get the convolution that feeds each (:func:`kalmannorm.link_cross_iteration`; a CBN
    layer with none is a ``ValueError``), and the module is
    returned, modified in place like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`
    (a BatchNorm passed as ``module`` itself is returned replaced). ``options`` go to the norm's
    constructor (e.g. ``stat_batch_size=2``).
    """
    converted = _swap(module, _spec(name), options, {})
    if any(isinstance(m, KalmanNormBase) for m in converted.modules()):
        link_chain(converted, example_input, flow=flow, source=source)
    if any(isinstance(m, CrossIterationBatchNorm) for m in converted.modules()):
        link_cross_iteration(converted, example_input)
    return converted


def find_chain(model: nn.Module) -> KalmanChain | None:
    """The chain the Kalman layers of ``model`` are linked in, if any."""
    return next((m.chain for m in model.modules() if isinstance(m, KalmanNormBase)), None)


def set_eval_statistics(model: nn.Module, mode: str) -> None:
    """Evaluate every layer that offers it (BKN, ghost BN, BRN, CBN) with ``"moving"`` or
    ``"batch"`` statistics, the paper's inference options B and A (Table 3); in batch mode each
    test statistics group of the layer's ``stat_batch_size`` is normalised with its own statistics.
    """
    from kalmannorm.layers.batch_kalman import EVAL_STATISTICS

    if mode not in EVAL_STATISTICS:
        raise ValueError(f"mode must be one of {EVAL_STATISTICS}, got {mode!r}")
    for m in model.modules():
        if hasattr(m, "eval_statistics"):
            m.eval_statistics = mode


def kalman_statistics(model: nn.Module) -> dict[str, KalmanStatistics]:
    """The statistics each Kalman layer of ``model`` estimated in its last forward, by name."""
    return {
        name: m.last_statistics
        for name, m in model.named_modules()
        if isinstance(m, KalmanNormBase) and m.last_statistics is not None
    }
