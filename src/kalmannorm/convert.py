"""Norms by name: the registry, ``build_norm`` and the recursive ``convert_norm`` swap.

Every norm the library offers is registered here under a short name ("bkn", "gkn", ...), built
from the BatchNorm layer it replaces, so the converter, the harness and the command line all
create layers the same way.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from kalmannorm._torch_private import BatchNormBase, NormBase
from kalmannorm.chain import WEIGHTED_LAYERS, KalmanChain, feeds
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
from kalmannorm.layers.ghost_batch import check_eval_statistics
from kalmannorm.normact import NormAct


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
    """A registered norm: its builder and what it declares about itself."""

    name: str
    build: Builder
    description: str
    #: chain options (``flow``, ``source``) the norm links with unless the caller gives them
    link_options: dict | None = None
    #: statistics over the samples of a group: it takes ``stat_batch_size`` and depends on the
    #: batch (False: per-sample statistics, which take no ``stat_batch_size``)
    batch_statistics: bool = False
    #: its builder takes its own ``eps`` (FRN: the paper's 1e-6), not the replaced BatchNorm's
    own_eps: bool = False


_REGISTRY: dict[str, NormSpec] = {}


def register_norm(
    name: str,
    description: str,
    link_options: dict | None = None,
    *,
    batch_statistics: bool = False,
    own_eps: bool = False,
) -> Callable[[Builder], Builder]:
    """Register ``build(source: SourceNorm, **options) -> nn.Module`` under ``name``;
    ``link_options`` are the chain options (``flow``, ``source``) :func:`convert_norm` links
    the norm's layers with unless given; ``batch_statistics`` and ``own_eps`` declare what
    :class:`NormSpec` says (the training harness passes ``stat_batch_size`` only to a norm
    with batch statistics)."""

    def decorate(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"a norm named {name!r} is already registered")
        _REGISTRY[name] = NormSpec(
            name, build, description, link_options, batch_statistics, own_eps
        )
        return build

    return decorate


def available_norms() -> dict[str, str]:
    """Registered norm names and their one-line descriptions."""
    return {name: spec.description for name, spec in sorted(_REGISTRY.items())}


def norm_spec(name: str) -> NormSpec:
    """The registration of the norm ``name`` (a ``ValueError`` listing the names if none)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; registered norms: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_norm(name: str, num_features: int, dims: int = 2, **options) -> nn.Module:
    """Build the norm ``name`` for ``num_features`` channels of ``dims``-d data (1, 2 or 3).

    A norm that declares its own ``eps`` (FRN: the paper's 1e-6 rather than BatchNorm's)
    receives a given ``eps`` as an option; the others take it as BatchNorm's eps.
    """
    spec = norm_spec(name)
    takes_eps = spec.own_eps
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
    return norm_spec(name).build(source, **options)


# -- the registered norms ---------------------------------------------------------------------

_BKN_BY_DIMS = {1: BatchKalmanNorm1d, 2: BatchKalmanNorm2d, 3: BatchKalmanNorm3d}


@register_norm(
    "bkn",
    "Batch Kalman Normalization (prior='learned' as in the paper, or 'propagate')",
    batch_statistics=True,
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


@register_norm(
    "bkn-flow",
    "BKN, recommended: prior propagated along the data flow from the producers' posteriors "
    "(prior='propagate', source='posterior'); best with center_conv_weights(model, "
    "layers='all') (docs/results/REPORT.md)",
    link_options={"flow": "data", "source": "posterior"},
    batch_statistics=True,
)
def _build_bkn_flow(source: SourceNorm, **options) -> nn.Module:
    options.setdefault("prior", "propagate")
    return _build_bkn(source, **options)


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


@register_norm(
    "bn",
    "BatchNorm; with stat_batch_size, ghost BatchNorm (statistics per group)",
    batch_statistics=True,
)
def _build_bn(source: SourceNorm, **options) -> nn.Module:
    return _GHOST_BY_DIMS[source.dims](**_batch_norm_kwargs(source), **options)


@register_norm(
    "brn",
    "Batch Renormalization (Ioffe 2017), r_max/d_max relaxed on a schedule",
    batch_statistics=True,
)
def _build_brn(source: SourceNorm, **options) -> nn.Module:
    return _BRN_BY_DIMS[source.dims](**_batch_norm_kwargs(source), **options)


@register_norm(
    "cbn",
    "Cross-Iteration BatchNorm (Yao et al. 2020): Taylor-compensated window of iterations",
    batch_statistics=True,
)
def _build_cbn(source: SourceNorm, **options) -> nn.Module:
    return _CBN_BY_DIMS[source.dims](**_batch_norm_kwargs(source), **options)


@register_norm(
    "mabn",
    "Moving Average BatchNorm (Yan et al. 2020): second moment, SMA forward and backward",
    batch_statistics=True,
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


@register_norm("frn", "Filter Response Normalization + TLU (Singh & Krishnan 2020)", own_eps=True)
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
#: BatchNorm forwards that only normalise: a subclass with another forward is warned about.
_PLAIN_FORWARDS = {BatchNormBase.forward, nn.SyncBatchNorm.forward}
#: Frozen norms found by class name (torchvision, timm and detectron2 stay optional).
_FROZEN_NAMES = {"FrozenBatchNorm2d": "frozen", "FrozenBatchNormAct2d": "frozen_act"}


def _kind(module: nn.Module) -> str | None:
    """What ``module`` is to the converter: ``"bn"`` (a BatchNorm, SyncBatchNorm included),
    ``"bn_act"`` (timm's BatchNormAct2d / SyncBatchNormAct), ``"lazy"`` (an uninitialised
    LazyBatchNorm), ``"frozen"``, ``"frozen_act"`` (timm's FrozenBatchNormAct2d), or ``None``."""
    frozen = _FROZEN_NAMES.get(type(module).__name__)
    if frozen and hasattr(module, "running_var") and not isinstance(module, NormBase):
        return frozen
    if not isinstance(module, BatchNormBase):
        return None
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy"
    if isinstance(getattr(module, "act", None), nn.Module):
        return "bn_act"
    return "bn"


def _describe_source(module: nn.Module, kind: str) -> SourceNorm:
    """The SourceNorm of a module of kind ``kind``; ``dims`` 0 when only the input tells (a
    SyncBatchNorm normalises any (N, C, ...) input)."""
    if kind in ("frozen", "frozen_act"):
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
    dims = next((d for cls, d in _DIMS_BY_CLASS.items() if isinstance(module, cls)), 0)
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


class DimsFromInput:
    """Forward pre-hook of a norm built for a BatchNorm of unknown dimensionality (SyncBatchNorm,
    ``kalmannorm.norm_layer(dims=None)``): on the first call, the registered norm's class for
    the input's dimensionality ((N, C) or (N, C, L): 1d, (N, C, H, W): 2d, (N, C, D, H, W): 3d)
    replaces the 2d class it was built with (the 1d/2d/3d classes of a norm share their state and
    differ only in the input they accept), then the hook removes itself. A callable object, so
    that models holding it can be copied and pickled.
    """

    def __init__(self, name: str, options: dict) -> None:
        self.name, self.options = name, dict(options)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        dims = {2: 1, 3: 1, 4: 2, 5: 3}.get(x.dim()) if isinstance(x, torch.Tensor) else None
        if dims is None:
            return  # the layer's own check names the input it expects
        target = norm_class(self.name, dims, self.options)
        if target is not type(module):
            if target.__bases__ != type(module).__bases__:
                raise TypeError(
                    f"{type(module).__name__} got {x.dim()}D input; the norm {self.name!r} for "
                    f"{dims}d data is a {target.__name__}, which does not share its state: build "
                    f"it for {dims}d data (kalmannorm.norm_layer({self.name!r}, dims={dims}))"
                )
            module.__class__ = target
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is self:
                del module._forward_pre_hooks[key]


def norm_class(name: str, dims: int, options: dict | None = None) -> type[nn.Module]:
    """The class the registered norm ``name`` builds for ``dims``-d data (built on the meta
    device, nothing allocated)."""
    return type(build_norm(name, 8, dims, device=torch.device("meta"), **dict(options or {})))


_DIMS_DEPENDENT: dict[tuple, bool] = {}


def _needs_dims_from_input(name: str, options: dict) -> bool:
    """Whether the norm's class depends on the data's dimensionality (BKN, ghost BN, ...)."""
    key = (name, tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key not in _DIMS_DEPENDENT:
        _DIMS_DEPENDENT[key] = len({norm_class(name, d, options) for d in (1, 2, 3)}) > 1
    return _DIMS_DEPENDENT[key]


def build_for_input(name: str, source: SourceNorm, options: dict) -> nn.Module:
    """``spec.build(source)``; with ``source.dims == 0`` the 2d norm, which takes the input's
    dimensionality on its first forward (:class:`DimsFromInput`)."""
    spec = norm_spec(name)
    if source.dims:
        return spec.build(source, **options)
    layer = spec.build(replace(source, dims=2), **options)
    if _needs_dims_from_input(name, options):
        layer.register_forward_pre_hook(DimsFromInput(name, options))
    return layer


@dataclass
class ConversionReport:
    """What :func:`convert_norm` did, by class of the layers it found (``converted``), kept
    (``kept``: frozen norms of frozen stages with ``keep_frozen``), and the subclasses whose own
    forward it replaced (``overridden``)."""

    converted: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    overridden: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.converted.values())


def _frozen_stage_norms(root: nn.Module) -> set[int]:
    """Frozen norms whose feeding convolution does not train (a frozen stage), or that have no
    feeding convolution: the ones ``keep_frozen=True`` leaves as they are."""
    kept, convolutions = set(), []
    for module in root.modules():  # registration order, as find_feeding_layers
        if _kind(module) in ("frozen", "frozen_act"):
            width = module.running_var.shape[0]
            feeding = next((c for c in reversed(convolutions) if feeds(c, width)), None)
            weight = getattr(feeding, "weight", None)
            if not (isinstance(weight, nn.Parameter) and weight.requires_grad):
                kept.add(id(module))
        elif isinstance(module, WEIGHTED_LAYERS):
            convolutions.append(module)
    return kept


def _swap(
    module: nn.Module,
    path: str,
    name: str,
    options: dict,
    done: dict[int, nn.Module],
    report: ConversionReport,
    keep: set[int],
) -> nn.Module:
    """Replace BatchNorms below ``module``; a BatchNorm used in several places stays shared."""
    if id(module) in done:
        return done[id(module)]
    kind = _kind(module)
    if kind == "lazy":
        raise ValueError(
            f"{type(module).__name__} '{path or 'root'}' is uninitialised (a lazy module learns "
            f"its channels on its first forward call), so convert_norm cannot build its "
            f"replacement: run the model once (model(x)), then convert it."
        )
    if kind is not None and id(module) in keep:
        report.kept[type(module).__name__] += 1
        done[id(module)] = module
        return module
    if kind is not None:
        new = build_for_input(name, _describe_source(module, kind), options)
        _copy_state(module, new)
        if kind in ("bn_act", "frozen_act"):
            new = NormAct(new, getattr(module, "drop", None), module.act)
        elif kind == "bn" and type(module).forward not in _PLAIN_FORWARDS:
            report.overridden[type(module).__name__] += 1
        new.train(module.training)
        report.converted[type(module).__name__] += 1
        done[id(module)] = new
        return new
    done[id(module)] = module
    for child_name, child in list(module._modules.items()):  # every slot, shared ones included
        if child is None:
            continue
        replaced = _swap(child, f"{path}.{child_name}" if path else child_name, name, options,
                         done, report, keep)  # fmt: skip
        if replaced is not child:
            setattr(module, child_name, replaced)
    return module


def _other_norms(module: nn.Module) -> Counter:
    """Normalization layers the converter does not replace (LayerNorm, GroupNorm, ...)."""
    return Counter(
        type(m).__name__
        for m in module.modules()
        if "Norm" in type(m).__name__ and not isinstance(m, NormAct) and _kind(m) is None
    )


def _warn_report(module: nn.Module, report: ConversionReport) -> None:
    if report.total == 0 and not report.kept:
        others = _other_norms(module)
        found = (
            "; its normalization layers are " + ", ".join(f"{n} x{c}" for n, c in others.items())
            if others
            else ""
        )
        warnings.warn(
            f"convert_norm: 0 layers converted: {type(module).__name__} holds no BatchNorm1d/2d/"
            f"3d, SyncBatchNorm, torchvision/timm/detectron2 FrozenBatchNorm2d or timm "
            f"BatchNormAct2d/FrozenBatchNormAct2d{found}. The model is returned unchanged.",
            stacklevel=3,
        )
    if report.overridden:
        listed = ", ".join(f"{n} x{c}" for n, c in report.overridden.items())
        warnings.warn(
            f"convert_norm replaced BatchNorm subclasses that define their own forward ({listed}): "
            f"the new layers normalise as their norm does; whatever else those forwards did is "
            f"not kept.",
            stacklevel=3,
        )


def convert_norm(
    module: nn.Module,
    name: str = "bkn",
    *,
    example_input: object = None,
    flow: str | None = None,
    source: str | None = None,
    keep_frozen: bool = False,
    **options,
) -> nn.Module:
    """Replace every BatchNorm in ``module`` by the registered norm ``name``.

    Replaced: ``BatchNorm1d/2d/3d`` and their subclasses, ``SyncBatchNorm`` (its dimensionality
    taken from its input on the first forward call, or the traced one), torchvision's, timm's and
    detectron2's ``FrozenBatchNorm2d`` (found by class name: those packages stay optional), and
    timm's norm+activation layers ``BatchNormAct2d``, ``SyncBatchNormAct`` and
    ``FrozenBatchNormAct2d``, which become a :class:`kalmannorm.NormAct`: the new norm followed by
    the layer's own ``drop`` and ``act``, with the same state-dict keys. An uninitialised
    ``LazyBatchNorm`` is refused (run the model once first). A model with nothing to convert is
    returned with a warning ("0 layers converted").

    Weight, bias and running statistics are copied (a shared BatchNorm stays shared). A frozen
    norm becomes trainable (its weight and bias are parameters of the new layer: 2 C parameters
    more each); with ``keep_frozen=True`` the frozen norms of frozen stages (whose feeding
    convolution does not train, as torchvision's detection backbones below
    ``trainable_backbone_layers``) stay as they are.

    The Kalman layers are linked into one chain (``flow`` and ``source`` as in
    :func:`kalmannorm.link_chain`, unset: the norm's registered defaults; by default each
    layer's prior follows the data flow, traced on
    ``example_input`` when given, else on the model's first forward call; a GKN model's
    execution order likewise), Cross-Iteration BN layers get the convolution that feeds each
    (:func:`kalmannorm.link_cross_iteration`; a CBN layer with none is a ``ValueError``), and the
    module is returned, modified in place like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` (a BatchNorm passed as ``module``
    itself is returned replaced). ``options`` go to the norm's constructor (e.g.
    ``stat_batch_size=2``). :func:`last_conversion` tells what was converted.
    """
    from kalmannorm.autolink import link_model

    spec = norm_spec(name)
    if "stat_batch_size" in options and not spec.batch_statistics:
        raise TypeError(
            f"{name!r} computes each sample's statistics on its own, so it takes no "
            f"stat_batch_size: call convert_norm(model, {name!r}) without it"
        )
    link_options = spec.link_options or {}
    flow = link_options.get("flow") if flow is None else flow
    source = link_options.get("source", "batch") if source is None else source
    report = ConversionReport()
    keep = _frozen_stage_norms(module) if keep_frozen else set()
    converted = _swap(module, "", name, options, {}, report, keep)
    _LAST_REPORT[0] = report
    _warn_report(converted, report)
    if any(isinstance(m, KalmanNormBase) for m in converted.modules()):
        link_model(converted, example_input, flow=flow, source=source)
    if any(isinstance(m, CrossIterationBatchNorm) for m in converted.modules()):
        link_cross_iteration(converted, example_input)
    return converted


_LAST_REPORT: list[ConversionReport] = [ConversionReport()]


def last_conversion() -> ConversionReport:
    """The :class:`ConversionReport` of the last :func:`convert_norm` call (of this process)."""
    return _LAST_REPORT[0]


def find_chain(model: nn.Module) -> KalmanChain | None:
    """The chain the Kalman layers of ``model`` are linked in, if any."""
    return next((m.chain for m in model.modules() if isinstance(m, KalmanNormBase)), None)


def set_eval_statistics(model: nn.Module, mode: str) -> None:
    """Evaluate every layer that offers it (BKN, ghost BN, BRN, CBN, MABN) with ``"moving"`` or
    ``"batch"`` statistics, the paper's inference options B and A (Table 3); in batch mode each
    test statistics group of the layer's ``stat_batch_size`` is normalised with its own statistics.
    ``"auto"`` (BKN's and ghost BN's default): batch mode for layers with one-sample groups.
    """
    check_eval_statistics(mode)
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
