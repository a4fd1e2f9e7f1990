"""The zoo matrix: torchvision and timm model families x every registered norm.

Each cell builds the family's BatchNorm model, puts the norm in (``convert_norm`` without
``example_input``, or the family's own ``norm_layer=`` factory) and checks, on small inputs:

========== ===========================================================================
train      an SGD step (optimizer built before the first forward) gives a finite loss and a
           gradient to every parameter that requires one
eval       an eval forward is finite (a GKN model in eval never raises ChainOrderError)
state      the state dict of the trained model loads strictly into a freshly converted one
           (its chain not yet traced) and gives the same eval output
bn_ckpt    the BatchNorm model's checkpoint loads strictly; for norms with moving statistics
           that are BatchNorm's in eval (bkn, bn, brn, cbn) the eval output equals the BN
           model's (timm's norm+activation layers keep their activation)
fold       ``kalmannorm.fold`` gives the eval output
params     parameter count = the BN model's + the norm's documented extra (below) + 2 C per
           frozen norm made trainable; nothing lost, no Kalman parameter without a prior
========== ===========================================================================

Extra parameters per norm layer of C channels: BKN 3 C (a, R, q) where the layer has a
data-flow prior (none for the first layer and for layers whose input the moments do not model),
GKN G (G_up + 2) where it has an upstream, FRN and EvoNorm-S0 C, the others 0.

``python -m kalmannorm.lab.zoo`` (``kalmannorm zoo``) runs the whole matrix and prints a table;
``--quick`` the families of the test suite; ``--families``/``--norms`` a selection.
:func:`parameter_costs` measures each norm's parameter cost per model (``kalmannorm norms``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import kalmannorm
from kalmannorm.chain import ChainOrderError
from kalmannorm.layers.base import KalmanNormBase

CHECKS = ("train", "eval", "state", "bn_ckpt", "fold", "params")
#: Norms whose eval output with a BatchNorm checkpoint is the BatchNorm model's.
BN_EVAL_NORMS = ("bkn", "bn", "brn", "cbn")
#: Extra parameters per channel of a norm layer, over BatchNorm's 2 C (Kalman norms: by chain).
EXTRA_PER_CHANNEL = {"frn": 1, "evonorm_s0": 1}

Inputs = tuple[tuple, dict]


@dataclass(frozen=True)
class Family:
    """A model family: how to build its BatchNorm model, feed it and score it."""

    name: str
    group: str
    build: Callable[[], nn.Module]
    train_inputs: Callable[[], Inputs]
    eval_inputs: Callable[[], Inputs]
    loss: Callable[[object], Tensor]
    #: what eval outputs are compared on (detection: the backbone's features)
    probe: Callable[[nn.Module, Inputs], object] | None = None
    #: builds the model with the norm directly (``norm_layer=``) instead of converting
    factory: Callable[[str, dict], nn.Module] | None = None
    convert_options: dict = field(default_factory=dict)
    quick: bool = False


def _classification_loss(out: object) -> Tensor:
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # GoogLeNet / Inception outputs
        return sum(_classification_loss(t) for t in out if t is not None)
    if isinstance(out, dict):
        return sum(_classification_loss(t) for t in out.values() if t is not None)
    return out.float().logsumexp(1).mean()


def _detection_loss(out: object) -> Tensor:
    return sum(out.values())


def _images(size: int, batch: int = 4, frames: int = 0) -> Callable[[], Inputs]:
    def make() -> Inputs:
        generator = torch.Generator().manual_seed(1)
        shape = (batch, 3, frames, size, size) if frames else (batch, 3, size, size)
        return (torch.randn(*shape, generator=generator),), {}

    return make


def _detection_inputs(train: bool) -> Callable[[], Inputs]:
    def make() -> Inputs:
        generator = torch.Generator().manual_seed(1)
        images = [torch.rand(3, 112, 128, generator=generator) for _ in range(2)]
        if not train:
            return (images,), {}
        targets = [
            {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
        ]
        return (images, targets), {}

    return make


def _backbone_probe(model: nn.Module, inputs: Inputs) -> object:
    images = torch.stack(inputs[0][0])
    return model.backbone(images)


def _tv(name: str, **options) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **options)

    return build


def _tv_detection(name: str, **options) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=3, **options
        )

    return build


def _tv_frozen_rcnn() -> nn.Module:
    """Faster R-CNN on a ResNet-18 FPN backbone with FrozenBatchNorm2d, three stages training
    (torchvision's detection recipe with pretrained backbones)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    return FasterRCNN(backbone, num_classes=3, min_size=112, max_size=128)


def _tv_tiny_resnet() -> nn.Module:
    import torchvision
    from torchvision.models.resnet import BasicBlock

    return torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


def _tv_sync_resnet() -> nn.Module:
    return nn.SyncBatchNorm.convert_sync_batchnorm(_tv_tiny_resnet())


def _tv_tiny_video() -> nn.Module:
    from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv3DSimple, VideoResNet

    return VideoResNet(BasicBlock, [Conv3DSimple] * 4, [1, 1, 1, 1], BasicStem, num_classes=10)


def _timm(name: str, frozen: bool = False, **options) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10, **options)
        if frozen:
            from timm.layers import freeze_batch_norm_2d

            model = freeze_batch_norm_2d(model)
        return model

    return build


def _timm_factory(name: str) -> Callable[[str, dict], nn.Module]:
    def build(norm: str, options: dict) -> nn.Module:
        import timm

        return timm.create_model(
            name, pretrained=False, num_classes=10,
            norm_layer=kalmannorm.norm_layer(norm, **options),
        )  # fmt: skip

    return build


def _tv_factory(name: str, **model_options) -> Callable[[str, dict], nn.Module]:
    def build(norm: str, options: dict) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(
            name, weights=None, norm_layer=kalmannorm.norm_layer(norm, **options), **model_options
        )

    return build


def families() -> list[Family]:
    """Every family of the matrix (those whose package is missing are left out)."""
    found: list[Family] = []
    small, tiny, video = _images(64), _images(48), _images(32, frames=4)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        cls = "torchvision classification"
        tv = [
            ("resnet18", {}), ("resnet50", {}), ("resnext50_32x4d", {}), ("mobilenet_v2", {}),
            ("mobilenet_v3_small", {}), ("mobilenet_v3_large", {}), ("efficientnet_b0", {}),
            ("densenet121", {}), ("shufflenet_v2_x0_5", {}), ("mnasnet0_5", {}),
            ("regnet_y_400mf", {}), ("squeezenet1_1", {}), ("convnext_tiny", {}),
            ("googlenet", {"aux_logits": True, "init_weights": False}),
        ]  # fmt: skip
        for name, options in tv:
            found.append(Family(f"tv:{name}", cls, _tv(name, num_classes=10, **options),
                                small, small, _classification_loss))  # fmt: skip
        found.append(Family(
            "tv:inception_v3", cls,
            _tv("inception_v3", num_classes=10, aux_logits=True, init_weights=False),
            _images(299, batch=2), _images(299, batch=2), _classification_loss,  # (aux: 299)
        ))  # fmt: skip
        found.append(Family("tv:mobilenet_v2(0.25)", cls,
                            _tv("mobilenet_v2", num_classes=10, width_mult=0.25), tiny, tiny,
                            _classification_loss, quick=True))  # fmt: skip
        found.append(Family("tv:resnet(1,1,1,1) SyncBN", cls, _tv_sync_resnet, small, small,
                            _classification_loss))  # fmt: skip
        found.append(Family(
            "tv:resnet18 norm_layer=", cls, _tv("resnet18", num_classes=10), small, small,
            _classification_loss, factory=_tv_factory("resnet18", num_classes=10),
        ))  # fmt: skip
        det = "torchvision detection"
        for name in ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"):
            found.append(Family(f"tv:{name}", det, _tv_detection(name), _detection_inputs(True),
                                _detection_inputs(False), _detection_loss,
                                probe=_backbone_probe))  # fmt: skip
        for keep in (False, True):
            found.append(Family(
                f"tv:fasterrcnn_resnet18_fpn FrozenBN{' keep_frozen' if keep else ''}", det,
                _tv_frozen_rcnn, _detection_inputs(True), _detection_inputs(False),
                _detection_loss, probe=_backbone_probe,
                convert_options={"keep_frozen": True} if keep else {},
            ))  # fmt: skip
        seg = "torchvision segmentation"
        for name in ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"):
            found.append(Family(f"tv:{name}", seg, _tv_segmentation(name), small, small,
                                _classification_loss))  # fmt: skip
        vid = "torchvision video"
        found.append(Family("tv:r3d_18", vid, _tv("r3d_18", num_classes=10), video, video,
                            _classification_loss))  # fmt: skip
        found.append(Family("tv:video resnet(1,1,1,1)", vid, _tv_tiny_video, video, video,
                            _classification_loss))  # fmt: skip
    try:
        import timm  # noqa: F401
    except ImportError:
        return found
    group = "timm"
    for name, quick in (
        ("test_resnet", False), ("test_efficientnet", True), ("test_byobnet", False),
        ("efficientnet_b0", False), ("mobilenetv3_large_100", False), ("densenet121", False),
        ("regnety_008", False), ("ese_vovnet19b_dw", False), ("hrnet_w18_small", False),
        ("cspdarknet53", False),
    ):  # fmt: skip
        inputs = tiny if quick else small
        found.append(Family(f"timm:{name}", group, _timm(name), inputs, inputs,
                            _classification_loss, quick=quick))  # fmt: skip
    found.append(Family("timm:test_efficientnet FrozenBNAct", group,
                        _timm("test_efficientnet", frozen=True), tiny, tiny,
                        _classification_loss, quick=True))  # fmt: skip
    # (timm's MobileNetV3 builders set norm_layer themselves: convert those, as above)
    for name, quick in (
        ("test_efficientnet", True),
        ("test_resnet", False),
        ("efficientnet_b0", False),
        ("regnety_008", False),
    ):
        inputs = tiny if quick else small
        found.append(Family(f"timm:{name} norm_layer=", "timm factories", _timm(name), inputs,
                            inputs, _classification_loss, factory=_timm_factory(name),
                            quick=quick))  # fmt: skip
    return found


def _tv_segmentation(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=3
        )

    return build


# -- one cell ---------------------------------------------------------------------------------


def norm_options(norm: str) -> dict:
    """The options a cell builds ``norm`` with: statistics groups of 2 where it takes them."""
    from kalmannorm.lab.train.model import takes_stat_batch_size

    return {"stat_batch_size": 2} if takes_stat_batch_size(norm) else {}


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine values (so checkpoints are tested)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, low, high in (("running_mean", -0.2, 0.2), ("running_var", 0.5, 1.5),
                                    ("weight", 0.5, 1.5), ("bias", -0.2, 0.2)):  # fmt: skip
                value = getattr(module, name, None)
                is_norm = isinstance(getattr(module, "running_var", None), Tensor)
                if is_norm and isinstance(value, Tensor) and value.is_floating_point():
                    value.copy_(torch.empty_like(value).uniform_(low, high, generator=generator))


def _call(model: nn.Module, inputs: Inputs) -> object:
    args, kwargs = inputs
    return model(*args, **kwargs)


def _tensors(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _tensors(v)]
    return []


def _same(a: object, b: object, rtol: float = 1e-3) -> str | None:
    """``None`` when the two outputs agree, else what differs."""
    left, right = _tensors(a), _tensors(b)
    if len(left) != len(right):
        return f"{len(left)} vs {len(right)} output tensors"
    for x, y in zip(left, right):
        if x.shape != y.shape:
            return f"shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return "integer outputs differ"
            continue
        scale = float(y.abs().max()) if y.numel() else 1.0
        error = float((x - y).abs().max()) if x.numel() else 0.0
        if not math.isfinite(error) or error > rtol * max(scale, 1e-3):
            return f"max |diff| {error:.3g} at scale {scale:.3g}"
    return None


def _probe(family: Family, model: nn.Module, inputs: Inputs) -> object:
    model.eval()
    with torch.no_grad():
        if family.probe is not None:
            return family.probe(model, inputs)
        return _call(model, inputs)


def _build(family: Family, norm: str, options: dict) -> nn.Module:
    torch.manual_seed(0)
    if family.factory is not None:
        return family.factory(norm, options)
    bn = family.build()
    return kalmannorm.convert_norm(bn, norm, **family.convert_options, **options)


_FROZEN = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")


def _frozen_made_trainable(bn_model: nn.Module, model: nn.Module) -> int:
    """2 C for every frozen norm (weight, bias buffers) that became trainable."""
    kept = {name for name, m in model.named_modules() if type(m).__name__ in _FROZEN}
    return sum(
        2 * m.running_var.numel()
        for name, m in bn_model.named_modules()
        if type(m).__name__ in _FROZEN and name not in kept
    )


def expected_parameters(bn_model: nn.Module, model: nn.Module, norm: str) -> int:
    """The converted model's parameter count by the documented costs (module docstring)."""
    total = sum(p.numel() for p in bn_model.parameters())
    total += _frozen_made_trainable(bn_model, model)
    for module in model.modules():
        if isinstance(module, KalmanNormBase):
            chain = module.chain
            index = module.chain_index
            if chain is None or not chain.has_upstream(index) or module.is_batch_only():
                continue
            width = module.stat_width
            learned = module.prior == "learned"
            gain = width if module.learn_gain else 0
            if chain.flow == "execution":
                upstream = chain.layers[index - 1].stat_width
                total += gain + (width * upstream + width if learned else 0)
            else:
                total += gain + (2 * width if learned else 0)
        elif norm in EXTRA_PER_CHANNEL and _is_new_norm(module):
            total += EXTRA_PER_CHANNEL[norm] * module.num_features
    return total


def _is_new_norm(module: nn.Module) -> bool:
    from kalmannorm.layers import EvoNormS0, FilterResponseNorm

    return isinstance(module, FilterResponseNorm | EvoNormS0)


@dataclass
class Prepared:
    """A family's BatchNorm model, its checkpoint, inputs and eval output (shared by its cells)."""

    bn_model: nn.Module
    bn_state: dict
    train_inputs: Inputs
    eval_inputs: Inputs
    bn_output: object


def prepare(family: Family) -> Prepared:
    torch.manual_seed(0)
    bn_model = family.build()
    _randomize_norms(bn_model)
    eval_inputs = family.eval_inputs()
    return Prepared(bn_model, copy.deepcopy(bn_model.state_dict()), family.train_inputs(),
                    eval_inputs, _probe(family, bn_model, eval_inputs))  # fmt: skip


#: BatchNorm's statistics, which a batch-free norm's model does not hold.
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
#: Registered norms that are torch's own batch-free layers (GroupNorm, InstanceNorm): a BatchNorm
#: checkpoint loads into them once its statistics are removed (this library's norms drop them).
FOREIGN_BATCH_FREE = ("gn", "in")


def batch_free_checkpoint(state: dict, model: nn.Module) -> dict:
    """``state`` without the BatchNorm statistics that ``model`` does not hold."""
    keys = set(model.state_dict())
    kept = {k: v for k, v in state.items()
            if k in keys or k.rsplit(".", 1)[-1] not in BN_STATISTICS}  # fmt: skip
    metadata = getattr(state, "_metadata", None)
    result = type(state)(kept) if isinstance(state, dict) else dict(kept)
    if metadata is not None:
        result._metadata = metadata
    return result


def run_cell(family: Family, norm: str, prepared: Prepared | None = None) -> dict[str, str]:
    """The checks of one (family, norm) cell: ``"ok"``, ``"-"`` (not applicable) or the error."""
    results = dict.fromkeys(CHECKS, "not run")
    options = norm_options(norm)
    prepared = prepared or prepare(family)
    state: dict[str, object] = {}

    def check(name: str, action: Callable[[], str | None]) -> bool:
        try:
            problem = action()
        except Exception as error:  # a cell's failure is a result, not a crash
            problem = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        results[name] = "ok" if problem is None else problem
        return problem is None or problem == "-"

    def output() -> object:
        if "output" not in state:
            state["output"] = _probe(family, model, prepared.eval_inputs)
        return state["output"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build(family, norm, options)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        if not check("train", lambda: _check_train(family, model, optimizer,
                                                   prepared.train_inputs)):  # fmt: skip
            return results
        check("eval", lambda: _check_eval(model, prepared.eval_inputs))
        check("state", lambda: _check_state(family, norm, options, model, output(), prepared))
        check("bn_ckpt", lambda: _check_bn_checkpoint(family, norm, options, prepared))
        check("fold", lambda: _check_fold(family, model, output(), prepared))
        check("params", lambda: _check_params(prepared.bn_model, model, norm))
    return results


def _check_bn_checkpoint(family, norm, options, prepared: Prepared) -> str | None:
    model = _build(family, norm, options)
    checkpoint = copy.deepcopy(prepared.bn_state)
    if norm in FOREIGN_BATCH_FREE:  # torch's norms: BatchNorm's statistics removed first
        checkpoint = batch_free_checkpoint(checkpoint, model)
    model.load_state_dict(checkpoint)
    if norm not in BN_EVAL_NORMS:
        return None
    problem = _same(_probe(family, model, prepared.eval_inputs), prepared.bn_output)
    return None if problem is None else f"eval differs from the BN model's: {problem}"


def _check_train(family, model, optimizer, inputs) -> str | None:
    model.train()
    optimizer.zero_grad()
    loss = family.loss(_call(model, inputs))
    if not torch.isfinite(loss):
        return f"loss {float(loss)}"
    loss.backward()
    optimizer.step()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    unheld = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if unheld:
        return f"the optimizer misses {len(unheld)} parameters ({unheld[0]})"
    if missing:
        return f"{len(missing)} parameters without gradient ({missing[0]})"
    return None


def _check_eval(model, inputs) -> str | None:
    model.eval()
    try:
        with torch.no_grad():
            out = _call(model, inputs)
    except ChainOrderError as error:
        return f"ChainOrderError in eval: {error}"
    bad = [t for t in _tensors(out) if t.is_floating_point() and not torch.isfinite(t).all()]
    return "non-finite eval output" if bad else None


def _check_state(family, norm, options, model, output, prepared: Prepared) -> str | None:
    saved = copy.deepcopy(model.state_dict())
    fresh = _build(family, norm, options)
    fresh.load_state_dict(saved)
    problem = _same(_probe(family, fresh, prepared.eval_inputs), output, rtol=1e-5)
    return None if problem is None else f"reloaded eval differs: {problem}"


def _check_fold(family, model, output, prepared: Prepared) -> str | None:
    folded = kalmannorm.fold(model)
    problem = _same(_probe(family, folded, prepared.eval_inputs), output)
    return None if problem is None else f"folded eval differs: {problem}"


def _check_params(bn_model, model, norm) -> str | None:
    got = sum(p.numel() for p in model.parameters())
    expected = expected_parameters(bn_model, model, norm)
    if got != expected:
        return f"{got} parameters, expected {expected}"
    return None


# -- the matrix -------------------------------------------------------------------------------


def run_matrix(
    selected: list[Family], norms: list[str], progress: Callable[[str], None] | None = None
) -> list[tuple[Family, str, dict[str, str], float]]:
    rows = []
    for family in selected:
        try:
            prepared = prepare(family)
        except Exception as error:
            prepared = None
            failure = f"build: {type(error).__name__}: {error}"[:200]
        for norm in norms:
            start = time.perf_counter()
            try:
                if prepared is None:
                    raise RuntimeError(failure)
                result = run_cell(family, norm, prepared)
            except Exception as error:
                result = dict.fromkeys(CHECKS, f"build: {type(error).__name__}: {error}"[:200])
                if progress is not None:
                    progress(traceback.format_exc(limit=3))
            seconds = time.perf_counter() - start
            rows.append((family, norm, result, seconds))
            if progress is not None:
                status = "ok" if all(v in ("ok", "-") for v in result.values()) else "FAIL"
                progress(f"{family.name:<44} {norm:<11} {status:<4} {seconds:5.1f}s")
    return rows


def matrix_markdown(rows) -> str:
    """The matrix as a markdown table: one row per family, one column per norm (checks passed
    of 6), then the failures."""
    norms = list(dict.fromkeys(norm for _, norm, _, _ in rows))
    lines = ["| family | " + " | ".join(norms) + " |", "|---|" + "---|" * len(norms)]
    by_family: dict[str, dict[str, dict]] = {}
    for family, norm, result, _ in rows:
        by_family.setdefault(family.name, {})[norm] = result
    for name, cells in by_family.items():
        marks = []
        for norm in norms:
            result = cells.get(norm)
            passed = sum(v in ("ok", "-") for v in result.values()) if result else 0
            marks.append("ok" if passed == len(CHECKS) else f"{passed}/{len(CHECKS)}")
        lines.append(f"| {name} | " + " | ".join(marks) + " |")
    passed_cells = sum(all(v in ("ok", "-") for v in r.values()) for _, _, r, _ in rows)
    lines.append("")
    lines.append(f"{passed_cells} of {len(rows)} cells pass all {len(CHECKS)} checks.")
    failures = [
        f"- {family.name} x {norm}: {check}: {value}"
        for family, norm, result, _ in rows
        for check, value in result.items()
        if value not in ("ok", "-")
    ]
    if failures:
        lines += ["", "Failures:", *failures]
    return "\n".join(lines)


# -- parameter costs (kalmannorm norms) -------------------------------------------------------

COST_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
#: Variants measured beside the registered norms' defaults: (label, norm, options).
COST_VARIANTS = (
    ("bkn flow=execution", "bkn", {"flow": "execution"}),
    ("bkn prior=propagate", "bkn", {"prior": "propagate"}),
)
#: Parameters a norm layer of C channels holds beyond BatchNorm's 2 C.
COST_FORMULA = {
    "bkn": "3C (a, R, q) per layer with a data-flow prior; flow='execution': C*C_up + 2C "
    "(the paper's dense A); prior='propagate': 0",
    "gkn": "G*(G_up + 2) per layer with an upstream (G groups)",
    "frn": "C (tau)",
    "evonorm_s0": "C (v)",
}


@functools.cache
def parameter_costs(
    models: tuple[str, ...] = COST_MODELS,
    norms: tuple[str, ...] | None = None,
    variants: bool = False,
) -> dict[str, dict[str, float]]:
    """Converted / BatchNorm parameter count, per norm and torchvision model (the chain traced
    on a 64 px batch of 4, default options but statistics groups of 2; ``variants``: also
    :data:`COST_VARIANTS`). ``nan`` where the norm does not fit the model."""
    import torchvision

    rows = [(norm, norm, {}) for norm in norms or kalmannorm.available_norms()]
    if variants:
        rows += list(COST_VARIANTS)
    x = torch.randn(4, 3, 64, 64)
    costs: dict[str, dict[str, float]] = {label: {} for label, _, _ in rows}
    for name in models:
        base = torchvision.models.get_model(name, weights=None)
        count = sum(p.numel() for p in base.parameters())
        for label, norm, extra in rows:
            model = copy.deepcopy(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    kalmannorm.convert_norm(
                        model, norm, example_input=x, **norm_options(norm), **extra
                    )
                except (ValueError, RuntimeError):  # the norm does not fit (CBN on DenseNet)
                    costs[label][name] = math.nan
                    continue
            costs[label][name] = sum(p.numel() for p in model.parameters()) / count
    return costs


def costs_markdown(costs: dict[str, dict[str, float]]) -> str:
    models = list(next(iter(costs.values())))
    lines = ["| norm | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for norm, row in costs.items():
        cells = ("n/a" if math.isnan(row[m]) else f"x{row[m]:.3f}" for m in models)
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the test suite's families only")
    parser.add_argument("--families", help="comma-separated substrings of family names")
    parser.add_argument("--norms", help="comma-separated norm names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the families")
    parser.add_argument("--quiet", action="store_true", help="no per-cell progress lines")


def run(args: argparse.Namespace) -> int:
    selected = families()
    if args.quick:
        selected = [f for f in selected if f.quick]
    if args.families:
        wanted = [w.strip() for w in args.families.split(",") if w.strip()]
        selected = [f for f in selected if any(w in f.name for w in wanted)]
    if args.list:
        for family in selected:
            print(f"{family.name:<48} {family.group}")
        return 0
    norms = (
        [n.strip() for n in args.norms.split(",") if n.strip()]
        if args.norms
        else list(kalmannorm.available_norms())
    )
    unknown = sorted(set(norms) - set(kalmannorm.available_norms()))
    if unknown:
        print(f"unknown norms: {', '.join(unknown)}", file=sys.stderr)
        return 2
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    rows = run_matrix(selected, norms, progress)
    print(matrix_markdown(rows))
    failed = any(any(v not in ("ok", "-") for v in r.values()) for _, _, r, _ in rows)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kalmannorm.lab.zoo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
