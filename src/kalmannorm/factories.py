"""The norms as ``norm_layer`` arguments: torchvision, timm, mmcv and detectron2.

Model constructors take their norm as a callable ``norm_layer(num_channels)`` (torchvision,
timm, detectron2's ``get_norm``) or as a config naming a class (mmcv's ``build_norm_layer``);
timm builds norm+activation layers from it (``get_norm_act_layer``). One factory serves all:

``kalmannorm.norm_layer(name, **options)``
    ``functools.partial(NormLayer, norm=name, **options)``: called with the channel count
    (and BatchNorm's ``eps``, ``momentum``, ``affine``, ``track_running_stats``, ``device``,
    ``dtype`` where a constructor passes them), it builds the registered norm ``name`` (channels
    first: ``norm_layer("gkn")(64)`` is a GroupKalmanNorm of 64 channels with the default groups).
    ``torchvision.models.resnet50(norm_layer=kalmannorm.norm_layer("bkn", stat_batch_size=2))``.

:class:`NormLayer`
    The factory as a class (timm's and mmcv's factories want a type): ``NormLayer(64,
    norm="bkn")`` returns a ``BatchKalmanNorm2d``. mmcv: ``norm_cfg=dict(type=NormLayer,
    norm="bkn", stat_batch_size=2)``, or :func:`register_mmcv` and ``dict(type="KalmanNorm",
    ...)``; its ``_abbr_`` is ``"bn"``, so mmcv names the layers as for BatchNorm and BatchNorm
    checkpoints keep their keys.

:class:`KalmanNormAct2d`
    timm's norm+activation signature (``apply_act``, ``act_layer``, ``act_kwargs``,
    ``inplace``, ``drop_layer``) over any registered norm: a :class:`kalmannorm.NormAct`.
    :func:`register_timm` (called by :func:`norm_layer` when timm is imported) lets timm's
    ``get_norm_act_layer`` map :class:`NormLayer`, every class of this library's registered norms
    and the names ``"kalmannorm_<name>"`` (``-`` as ``_``; also ``"bkn"``, ``"gkn"``) to it, so
    ``timm.create_model("efficientnet_b0", norm_layer=kalmannorm.norm_layer("bkn"))`` keeps the
    model's activations, and ``norm_layer="kalmannorm_bkn"`` works for both kinds of timm models.

Layers built by these factories own their data-flow Kalman parameters (BKN: a, R, q per
channel) from the start, so an optimizer built right after the model holds them; the chain links
itself on the model's first forward call (:mod:`kalmannorm.autolink`), traced on that input.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from typing import Any

import torch
from torch import nn

from kalmannorm.autolink import await_link
from kalmannorm.convert import SourceNorm, available_norms, build_for_input, norm_spec
from kalmannorm.layers.base import KalmanNormBase
from kalmannorm.layers.batch_kalman import BatchKalmanNorm
from kalmannorm.layers.cross_iteration import CrossIterationBatchNorm
from kalmannorm.normact import NormAct


def make_norm(
    num_features: int,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = True,
    device: Any = None,
    dtype: torch.dtype | None = None,
    *,
    norm: str = "bkn",
    dims: int | None = None,
    **options,
) -> nn.Module:
    """The registered norm ``norm`` for ``num_features`` channels, BatchNorm's arguments mapped
    as by :func:`kalmannorm.build_norm` (``dims=None``: 2d until the first input tells)."""
    spec = norm_spec(norm)
    if spec.own_eps and eps != 1e-5:
        options = {**options, "eps": eps}  # FRN: a given eps is the norm's own
    source = SourceNorm(
        num_features=num_features,
        dims=dims or 0,
        eps=eps,
        momentum=momentum,
        affine=affine,
        track_running_stats=track_running_stats,
        device=torch.device(device) if device is not None else torch.device("cpu"),
        dtype=dtype if dtype is not None else torch.get_default_dtype(),
    )
    layer = build_for_input(norm, source, options)
    link_options = spec.link_options
    if link_options and isinstance(layer, KalmanNormBase):
        layer.link_options = dict(link_options)  # what its chain links with (autolink)
    _own_kalman_parameters(layer)
    if isinstance(layer, CrossIterationBatchNorm):
        await_link(layer)  # its feeding convolution is found on the model's first forward
    return layer


_BUILT = threading.local()


def _own_kalman_parameters(layer: nn.Module) -> None:
    """Give a Kalman layer the parameters its chain will most likely give it, so that an
    optimizer built before the model's first forward holds them: BKN's data-flow a, R, q; GKN's
    q, R and the transition from the group count of the GKN layer built before it (models build
    their layers in the order they run them; a wrong guess is replaced, with a warning, when the
    chain is linked)."""
    if not isinstance(layer, KalmanNormBase) or layer.is_batch_only() or layer.gain is not None:
        return
    if isinstance(layer, BatchKalmanNorm):
        layer._create_kalman_parameters(None)
        return
    previous = getattr(_BUILT, "group_layer", None)
    previous = previous() if previous is not None else None
    if previous is not None and layer._reference_tensor().device.type != "meta":
        layer._create_kalman_parameters(previous.stat_width)
    if layer._reference_tensor().device.type != "meta":
        _BUILT.group_layer = weakref.ref(layer)


class NormLayer:
    """``norm_layer=`` factory type: ``NormLayer(num_features, ..., norm="bkn", **options)``
    returns the registered norm ``norm`` (an instance of that norm's class, not of this one).

    BatchNorm's positional arguments (eps, momentum, affine, track_running_stats) and
    ``device``/``dtype`` are accepted as model constructors pass them; ``dims`` (1, 2, 3) fixes
    the dimensionality, by default taken from the first input.
    """

    _abbr_ = "bn"  # mmcv's layer names (bn1, ...), as for the BatchNorm it replaces

    def __new__(cls, num_features: int, *args, **kwargs) -> nn.Module:  # type: ignore[misc]
        return make_norm(num_features, *args, **kwargs)


def norm_layer(name: str = "bkn", *, dims: int | None = None, **options) -> functools.partial:
    """A ``norm_layer`` callable building the registered norm ``name`` with ``options``:
    ``norm_layer("bkn", stat_batch_size=2)(64)`` is a ``BatchKalmanNorm2d(64,
    stat_batch_size=2)``; ``norm_layer("gkn", num_groups=8)(64)`` a ``GroupKalmanNorm(8, 64)``.
    The options are checked now (one layer is built). Registers the norms with timm when timm is
    imported (:func:`register_timm`)."""
    make_norm(8, norm=name, dims=dims or 2, device="meta", **options)
    if "timm" in sys.modules:
        register_timm()
    return functools.partial(NormLayer, norm=name, dims=dims, **options)


def _activation(act_layer: Any, act_kwargs: dict | None, inplace: bool) -> nn.Module | None:
    """timm's ``create_act_layer`` when timm is installed; else a class or callable called with
    ``inplace`` where it takes it."""
    kwargs = dict(act_kwargs or {})
    if act_layer is None:
        return None
    try:
        from timm.layers import create_act_layer
    except ImportError:
        create_act_layer = None
    if create_act_layer is not None:
        return create_act_layer(act_layer, inplace=inplace, **kwargs)
    if isinstance(act_layer, str):
        raise ValueError(f"activation {act_layer!r} by name needs timm; pass a module class")
    if isinstance(act_layer, nn.Module):
        return act_layer
    try:
        return act_layer(inplace=inplace, **kwargs)
    except TypeError:
        return act_layer(**kwargs)


class KalmanNormAct2d(NormAct):
    """timm's ``BatchNormAct2d`` signature over any registered norm (``norm=``, ``**options``):
    ``act(drop(norm(x)))`` with timm's keys (:class:`kalmannorm.NormAct`)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        act_kwargs: dict | None = None,
        inplace: bool = True,
        drop_layer: type[nn.Module] | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        norm: str = "bkn",
        dims: int | None = 2,
        **options,
    ) -> None:
        layer = make_norm(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            norm=norm, dims=dims, **options,
        )  # fmt: skip
        drop = drop_layer() if drop_layer is not None else None
        act = _activation(act_layer, act_kwargs, inplace) if apply_act else None
        super().__init__(layer, drop, act)


# -- framework registrations -------------------------------------------------------------------

_TIMM_ALIASES = ("bkn", "gkn")


def register_timm() -> None:
    """Let timm's norm factories build this library's norms (idempotent; needs timm).

    After it, ``timm.create_model(name, norm_layer=...)`` accepts for models with plain norms
    (ResNets) and for models with norm+activation layers (EfficientNet, MobileNetV3, RegNet,
    DenseNet, CSPNet, VoVNet) alike: :func:`norm_layer`'s callables, :class:`NormLayer`, the
    classes of the registered norms (``kalmannorm.BatchKalmanNorm2d`` or a ``functools.partial``
    of it) and the names ``"kalmannorm_<name>"`` (and ``"bkn"``, ``"gkn"``). Adds entries to
    timm's ``layers.create_norm._NORM_MAP`` and ``layers.create_norm_act`` maps; nothing of timm
    is replaced.
    """
    from timm.layers import create_norm, create_norm_act

    act_map = create_norm_act._NORM_ACT_MAP
    reverse = create_norm_act._NORM_TO_NORM_ACT_MAP
    requires_arg = create_norm_act._NORM_ACT_REQUIRES_ARG
    create_norm_act._NORM_ACT_TYPES.add(KalmanNormAct2d)
    requires_arg.add(KalmanNormAct2d)
    reverse.setdefault(NormLayer.__name__.lower(), KalmanNormAct2d)
    for name in available_norms():
        act = _timm_norm_act(name)
        plain = _timm_norm(name)
        requires_arg.add(act)
        keys = ["kalmannorm" + name.replace("_", "").replace("-", "")]  # timm cuts at "-"
        if name in _TIMM_ALIASES:
            keys.append(name)
        for key in keys:
            create_norm._NORM_MAP.setdefault(key, plain)
            act_map.setdefault(key, act)
        for dims in (1, 2, 3):
            cls = _class_of(name, dims)
            if cls is not None and cls.__module__.startswith("kalmannorm"):
                reverse.setdefault(cls.__name__.lower(), act)


@functools.cache
def _timm_norm(name: str) -> functools.partial:
    return functools.partial(NormLayer, norm=name)


@functools.cache
def _timm_norm_act(name: str) -> functools.partial:
    return functools.partial(KalmanNormAct2d, norm=name)


@functools.cache
def _class_of(name: str, dims: int) -> type[nn.Module] | None:
    from kalmannorm.convert import norm_class

    try:
        return norm_class(name, dims)
    except (TypeError, ValueError):
        return None


def register_mmcv(registry: Any, name: str = "KalmanNorm") -> None:
    """Register :class:`NormLayer` as ``name`` in an mmcv/mmengine registry (mmengine's
    ``MODELS``, mmcv 1.x's ``NORM_LAYERS``): ``norm_cfg=dict(type="KalmanNorm", norm="bkn",
    stat_batch_size=2)`` then builds the norm through ``build_norm_layer``. Passing the class
    itself, ``dict(type=kalmannorm.NormLayer, ...)``, needs no registration."""
    registry.register_module(name=name, module=NormLayer, force=True)
