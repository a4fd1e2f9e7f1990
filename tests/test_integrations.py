"""Drop-in wherever BatchNorm goes (issue 15): timm's norm+activation layers, SyncBatchNorm, lazy
BatchNorms, strict loading, self-linking models, the norm_layer factories of torchvision, timm,
mmcv and detectron2, keep_frozen, and one warning per conversion."""

import copy
import functools
import inspect
import warnings

import pytest
import torch
from torch import nn

import kalmannorm
from kalmannorm.baselines import GhostBatchNorm2d
from kalmannorm.layers import KalmanNormBase

torchvision = pytest.importorskip("torchvision")


def _kalman(model):
    return [m for m in model.modules() if isinstance(m, KalmanNormBase)]


def _randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_mean.uniform_(-0.2, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
                if isinstance(getattr(m, "weight", None), torch.Tensor):
                    m.weight.uniform_(0.5, 1.5, generator=generator)


def _stack(norm=nn.BatchNorm2d):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), norm(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), norm(4),
    )  # fmt: skip


# -- timm's norm + activation layers ----------------------------------------------------------


def test_timm_batchnormact_keeps_its_activation_and_checkpoint_keys():
    timm = pytest.importorskip("timm")
    reference = timm.create_model("test_efficientnet", num_classes=10)
    _randomize(reference)
    acts = [type(m.act).__name__ for m in reference.modules() if hasattr(m, "act")]
    checkpoint = copy.deepcopy(reference.state_dict())
    model = kalmannorm.convert_norm(timm.create_model("test_efficientnet", num_classes=10), "bkn")
    converted = [m for m in model.modules() if isinstance(m, kalmannorm.NormAct)]
    assert [type(m.act).__name__ for m in converted] == acts and "SiLU" in acts
    assert kalmannorm.last_conversion().converted == {"BatchNormAct2d": len(acts)}
    model.load_state_dict(checkpoint)  # strict: timm's keys, the Kalman ones filled
    assert set(checkpoint) <= set(model.state_dict())
    x = torch.randn(2, 3, 48, 48)
    reference.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    # and back: a converted checkpoint loads into the timm BN model (Kalman keys unexpected)
    back = timm.create_model("test_efficientnet", num_classes=10)
    result = back.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    assert {k.rsplit(".", 1)[-1] for k in result.unexpected_keys} <= {
        "transition", "noise_raw", "gain_logit"
    }  # fmt: skip


def test_timm_frozen_batchnormact_is_converted_with_its_activation():
    timm = pytest.importorskip("timm")
    from timm.layers import FrozenBatchNormAct2d, freeze_batch_norm_2d

    reference = freeze_batch_norm_2d(timm.create_model("test_efficientnet", num_classes=10))
    _randomize(reference)
    frozen = [m for m in reference.modules() if isinstance(m, FrozenBatchNormAct2d)]
    model = kalmannorm.convert_norm(copy.deepcopy(reference), "bn", stat_batch_size=2)
    assert not any(isinstance(m, FrozenBatchNormAct2d) for m in model.modules())
    assert len([m for m in model.modules() if isinstance(m, kalmannorm.NormAct)]) == len(frozen)
    x = torch.randn(2, 3, 48, 48)
    reference.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_normact_folds_its_norm_and_keeps_the_activation():
    norm = kalmannorm.BatchKalmanNorm2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), kalmannorm.NormAct(norm, act=nn.ReLU()))
    _randomize(model)
    model.eval()
    folded = kalmannorm.fold(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
        assert (folded(x) >= 0).all()
    assert model[1].num_features == 8 and model[1].running_var is norm.running_var


# -- SyncBatchNorm, lazy BatchNorms, nothing to convert ---------------------------------------


@pytest.mark.parametrize(("conv", "shape", "expected"), [
    (nn.Conv1d, (4, 3, 9), kalmannorm.BatchKalmanNorm1d),
    (nn.Conv2d, (4, 3, 7, 7), kalmannorm.BatchKalmanNorm2d),
    (nn.Conv3d, (4, 3, 5, 5, 5), kalmannorm.BatchKalmanNorm3d),
])  # fmt: skip
def test_sync_batchnorm_takes_its_dimensionality_from_the_input(conv, shape, expected):
    model = nn.Sequential(conv(3, 8, 3), nn.SyncBatchNorm(8), nn.ReLU(), conv(8, 8, 1),
                          nn.SyncBatchNorm(8))  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    kalmannorm.convert_norm(model, "bkn", stat_batch_size=2)
    assert kalmannorm.last_conversion().converted == {"SyncBatchNorm": 2}
    model(torch.randn(*shape)).sum().backward()
    assert type(model[1]) is expected and type(model[4]) is expected
    assert model[4].transition.grad is not None
    assert not model[1]._forward_pre_hooks  # the dimensionality hook removed itself
    copy.deepcopy(model)(torch.randn(*shape))


def test_sync_batchnorm_of_a_torchvision_resnet_is_converted():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=3))
    kalmannorm.convert_norm(model, "gn")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 20


def test_an_uninitialised_lazy_batchnorm_is_refused_and_an_initialised_one_converted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d '1' is uninitialised.*run the model"):
        kalmannorm.convert_norm(model, "bkn")
    model(torch.randn(2, 3, 5, 5))
    kalmannorm.convert_norm(model, "bkn")
    assert isinstance(model[1], kalmannorm.BatchKalmanNorm2d)


def test_a_model_with_nothing_to_convert_says_so():
    with pytest.warns(UserWarning, match=r"0 layers converted: ConvNeXt.*LayerNorm2d x"):
        kalmannorm.convert_norm(torchvision.models.convnext_tiny(), "bkn")
    with pytest.warns(UserWarning, match="0 layers converted: SqueezeNet"):
        kalmannorm.convert_norm(torchvision.models.squeezenet1_1(), "gkn")


def test_a_batchnorm_subclass_with_its_own_forward_is_named():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.warns(UserWarning, match=r"define their own forward \(Scaled x1\)"):
        kalmannorm.convert_norm(nn.Sequential(nn.Conv2d(3, 4, 1), Scaled(4)), "bn")


# -- strict loading ---------------------------------------------------------------------------


def test_strict_loading_catches_a_kalman_checkpoint_with_missing_keys():
    x = torch.randn(4, 3, 6, 6)
    model = kalmannorm.convert_norm(_stack(), "bkn", stat_batch_size=2, example_input=x)
    saved = model.state_dict()
    assert saved._metadata["4"]["version"] >= 10
    partial = copy.copy(saved)
    partial._metadata = saved._metadata
    del partial["4.transition"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"4.transition"'):
        model.load_state_dict(partial)
    result = model.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["4.transition"]
    # a BatchNorm checkpoint (metadata version 2) and one without metadata load strictly
    model.load_state_dict(_stack().state_dict())
    model.load_state_dict(dict(_stack().state_dict()))


def test_a_fresh_model_takes_the_kalman_parameters_of_a_checkpoint_before_its_trace():
    """Before its first forward a converted model cannot know which layers get a prior; the
    checkpoint of the traced model tells (here: the first layer has none, the others have)."""

    class Later(nn.Module):  # registers its first-running norm last
        def __init__(self):
            super().__init__()
            self.conv2, self.bn2 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    x = torch.randn(4, 3, 6, 6)
    model = kalmannorm.convert_norm(Later(), "bkn", stat_batch_size=2)
    model(x)
    assert model.bn1.transition is None and model.bn2.transition is not None
    fresh = kalmannorm.convert_norm(Later(), "bkn", stat_batch_size=2)
    assert fresh.bn2.transition is None  # provisional: the first registered has no prior
    torch.manual_seed(0)
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))


def test_batch_free_norms_of_the_library_load_a_batchnorm_checkpoint_strictly():
    for name in ("gkn", "frn", "evonorm_s0", "ln"):
        model = kalmannorm.convert_norm(_stack(), name)
        model.load_state_dict(_stack().state_dict())


# -- models that link themselves --------------------------------------------------------------


def test_a_model_built_from_the_classes_links_itself_and_warns_about_new_parameters():
    x = torch.randn(4, 3, 32, 32)
    model = torchvision.models.resnet18(num_classes=3, norm_layer=kalmannorm.BatchKalmanNorm2d)
    assert kalmannorm.find_chain(model) is None
    with pytest.warns(UserWarning, match="created .* an optimizer built before this call"):
        model(x)
    chain = kalmannorm.find_chain(model)
    assert chain.order_source == "traced" and len(chain) == 20
    assert model.layer1[0].bn2.transition.shape == (64,)


def test_a_model_built_by_the_factory_trains_with_an_optimizer_built_at_once():
    x = torch.randn(4, 3, 32, 32)
    model = torchvision.models.resnet18(
        num_classes=3, norm_layer=kalmannorm.norm_layer("bkn", stat_batch_size=2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    held = {id(p) for p in optimizer.param_groups[0]["params"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()
    assert all(id(p) in held for p in model.parameters())
    assert kalmannorm.find_chain(model).order_source == "traced"
    assert model.bn1.transition is None and model.layer4[1].bn2.transition.grad is not None


def test_linking_removes_the_global_module_hooks_before_any_forward_call():
    """A model linked by convert_norm or link_chain leaves no global hook for its first
    (possibly compiled) call: torch.compile warns about, and fires twice, global hooks."""
    from torch.nn.modules import module as torch_module

    def global_hooks() -> int:
        return len(torch_module._global_forward_pre_hooks)

    x = torch.randn(4, 3, 32, 32)
    before = global_hooks()
    built = torchvision.models.resnet18(num_classes=3, norm_layer=kalmannorm.norm_layer("bkn"))
    assert global_hooks() == before + 1  # its layers wait for a link
    kalmannorm.link_chain(built, example_input=x)
    assert global_hooks() == before
    converted = kalmannorm.convert_norm(
        torchvision.models.resnet18(num_classes=3), "bkn", stat_batch_size=2, example_input=x
    )
    assert global_hooks() == before and kalmannorm.find_chain(converted) is not None


def test_a_relink_keeps_the_parameter_objects_an_optimizer_holds():
    """GKN's transitions are sized by the upstream; the traced order differs from the build
    order at each downsampling block, and the relink keeps the objects (new shapes)."""
    model = torchvision.models.resnet18(num_classes=3, norm_layer=kalmannorm.norm_layer("gkn"))
    guessed = model.layer2[0].bn1.transition
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.layer2[0].bn1.transition is guessed and guessed.shape == (16, 8)
    held = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert all(id(p) in held for p in model.parameters())
    optimizer.step()


def test_a_part_called_before_the_model_links_the_whole_model_with_a_warning():
    model = nn.Sequential(_stack(kalmannorm.norm_layer("bkn")), nn.Flatten())
    with pytest.warns(UserWarning, match="a part of Sequential, ran before the whole model"):
        model[0](torch.randn(4, 3, 6, 6))
    chain = kalmannorm.find_chain(model)
    assert len(chain) == 3 and chain.names[0] == "0.1" and chain.order_source != "traced"
    model(torch.randn(4, 3, 6, 6))
    assert kalmannorm.find_chain(model).order_source == "traced"


def test_a_lone_layer_is_a_chain_of_one():
    layer = kalmannorm.BatchKalmanNorm2d(4)
    layer(torch.randn(4, 4, 3, 3))
    assert len(kalmannorm.find_chain(layer)) == 1 and layer.transition is None


def test_a_gkn_model_in_eval_never_raises_chain_order_error():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
            self.aux = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
            self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))

        def forward(self, x):
            x = self.body(x)
            if self.training:
                x = x + self.aux(x)
            return self.head(x)

    x = torch.randn(2, 3, 4, 4)
    model = kalmannorm.convert_norm(WithAux(), "gkn")
    model.eval()
    with torch.no_grad():
        model(x)  # the order is traced in training mode, where the auxiliary branch runs
    assert kalmannorm.find_chain(model).names == ["body.1", "aux.1", "head.1"]
    model.train()
    model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# -- the factories: torchvision, timm, mmcv, detectron2 ----------------------------------------


def test_norm_layer_is_channel_first_for_every_norm():
    for name in kalmannorm.available_norms():
        layer = kalmannorm.norm_layer(name)(16)
        assert layer.weight.shape == (16,), name
    gkn = kalmannorm.norm_layer("gkn", num_groups=4)(16)
    assert isinstance(gkn, kalmannorm.GroupKalmanNorm) and gkn.num_groups == 4
    with pytest.raises(TypeError):
        kalmannorm.norm_layer("gn", stat_batch_size=2)


def test_norm_layer_takes_the_dimensionality_from_the_input():
    layer = kalmannorm.norm_layer("bn", stat_batch_size=2)(4)
    layer(torch.randn(4, 4, 3, 3, 3))
    assert type(layer).__name__ == "GhostBatchNorm3d"


def test_timm_models_take_the_norms_by_factory_class_and_name():
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 48, 48)
    specs = [
        kalmannorm.norm_layer("bkn", stat_batch_size=2),
        functools.partial(kalmannorm.BatchKalmanNorm2d, stat_batch_size=2),
        "kalmannorm_bkn",
    ]
    for spec in specs:
        model = timm.create_model("test_efficientnet", num_classes=3, norm_layer=spec)
        assert isinstance(model.bn1, kalmannorm.NormAct) and type(model.bn1.act) is nn.SiLU
        assert isinstance(model.bn1.norm, kalmannorm.BatchKalmanNorm2d)
        model(x).sum().backward()
        assert kalmannorm.find_chain(model).order_source == "traced"
    plain = timm.create_model("test_resnet", num_classes=3, norm_layer="gkn")
    assert isinstance(plain.bn1, kalmannorm.GroupKalmanNorm)
    gkn = timm.create_model(
        "test_efficientnet", num_classes=3, norm_layer=kalmannorm.norm_layer("gkn")
    )
    assert isinstance(gkn.bn1.norm, kalmannorm.GroupKalmanNorm)


def test_mmcv_build_norm_layer_stand_in():
    """mmcv's ``build_norm_layer(cfg, num_features, postfix)``, reduced to what it does with a
    norm class: abbreviation, ``requires_grad``, ``eps`` default, ``cls(num_features, **cfg)``."""
    registry = {}

    class Registry:
        def register_module(self, name, module, force=False):
            assert inspect.isclass(module)
            registry[name] = module

    def build_norm_layer(cfg, num_features, postfix=""):
        cfg = dict(cfg)
        layer_type = cfg.pop("type")
        cls = layer_type if inspect.isclass(layer_type) else registry[layer_type]
        abbr = cls._abbr_ if hasattr(cls, "_abbr_") else "norm_layer"
        requires_grad = cfg.pop("requires_grad", True)
        cfg.setdefault("eps", 1e-5)
        layer = cls(num_features, **cfg)
        for p in layer.parameters():
            p.requires_grad = requires_grad
        return abbr + str(postfix), layer

    kalmannorm.register_mmcv(Registry())
    name, layer = build_norm_layer(dict(type="KalmanNorm", norm="bkn", stat_batch_size=2), 16, 1)
    assert name == "bn1" and isinstance(layer, kalmannorm.BatchKalmanNorm2d)
    assert layer.stat_batch_size == 2
    _, frozen = build_norm_layer(
        dict(type=kalmannorm.NormLayer, norm="gkn", requires_grad=False), 16
    )
    assert isinstance(frozen, kalmannorm.GroupKalmanNorm)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_detectron2_get_norm_stand_in():
    """detectron2's ``get_norm(norm, out_channels)``: a callable is called with the channels."""

    def get_norm(norm, out_channels):
        if isinstance(norm, str):
            norm = {"BN": nn.BatchNorm2d, "GN": lambda c: nn.GroupNorm(32, c)}[norm]
        return norm(out_channels)

    layer = get_norm(kalmannorm.norm_layer("bkn", stat_batch_size=2), 64)
    assert isinstance(layer, kalmannorm.BatchKalmanNorm2d) and layer.num_features == 64


def test_a_factory_built_cross_iteration_model_finds_its_convolutions():
    model = _stack(kalmannorm.norm_layer("cbn", window_size=2))
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    assert model[1].feeding.module is model[0]


# -- frozen backbones, one warning per conversion ---------------------------------------------


def test_keep_frozen_leaves_the_frozen_stages_of_a_detection_backbone_frozen():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    def backbone():
        return resnet_fpn_backbone(
            backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
            trainable_layers=3,
        )  # fmt: skip

    count = sum(p.numel() for p in backbone().parameters())
    converted = kalmannorm.convert_norm(backbone(), "bn", stat_batch_size=2)
    frozen_channels = sum(m.num_features for m in converted.modules()
                          if isinstance(m, GhostBatchNorm2d))  # fmt: skip
    assert sum(p.numel() for p in converted.parameters()) == count + 2 * frozen_channels
    kept = kalmannorm.convert_norm(backbone(), "bn", stat_batch_size=2, keep_frozen=True)
    report = kalmannorm.last_conversion()
    assert report.kept == {"FrozenBatchNorm2d": 5} and report.total == 15  # bn1, layer1 kept
    assert isinstance(kept.body.bn1, FrozenBatchNorm2d)
    assert isinstance(kept.body.layer1[0].bn1, FrozenBatchNorm2d)
    assert kept.body.layer2[0].bn1.weight.requires_grad


def test_propagate_fallbacks_are_one_warning_per_conversion():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kalmannorm.convert_norm(
            torchvision.models.densenet121(), "bkn", flow="execution", prior="propagate"
        )
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "59 of 121 Kalman layers" in messages[0] and "and 55 more" in messages[0]
