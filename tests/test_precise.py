"""kalmannorm.update_bn (PreciseBN) against population statistics computed directly."""

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as torch_f

import kalmannorm
from kalmannorm.precise import update_bn

DT = torch.float64


def _batches(count=5, size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 2, 4, 4, dtype=DT, generator=generator) * 2 + 1, torch.zeros(size))
        for _ in range(count)
    ]


def _model(name, **options):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
    ).double()
    if name != "torch":
        kalmannorm.convert_norm(model, name, **options)
    # a few training steps: the moving statistics (and windows, clocks) move
    for x, _ in _batches(3, seed=1):
        model(x).square().mean().backward()
    return model


def _group_stats(z, s):
    """Per-group means (G, C), unbiased variances and second moments, directly."""
    groups = z.shape[0] // s
    means, variances, seconds = [], [], []
    for g in range(groups):
        part = z[g * s : (g + 1) * s].transpose(0, 1).reshape(z.shape[1], -1)
        means.append(part.mean(1))
        variances.append(part.var(1, unbiased=True))
        seconds.append(part.square().mean(1))
    return torch.stack(means), torch.stack(variances), torch.stack(seconds)


def _normalise(z, layer, s, second_moment=False):
    """The layer's batch-statistics output per group, directly."""
    outs = []
    for g in range(z.shape[0] // s):
        part = z[g * s : (g + 1) * s]
        if second_moment:
            chi2 = part.square().mean(dim=(0, 2, 3), keepdim=True)
            out = part / (chi2 + layer.eps).sqrt()
        else:
            out = torch_f.batch_norm(part, None, None, training=True, eps=layer.eps)
        outs.append(out * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))
    return torch.cat(outs)


def _expected(model, batches, s, second_moment=False):
    """Population averages over every statistics group of every batch, layer by layer."""
    sums = {1: [], 4: []}
    with torch.no_grad():
        for x, _ in batches:
            z1 = model[0](x)
            sums[1].append(_group_stats(z1, s))
            h = torch.relu(_normalise(z1, model[1], s, second_moment))
            sums[4].append(_group_stats(model[3](h), s))
    out = {}
    for index, stats in sums.items():
        mean = torch.cat([m for m, _, _ in stats]).mean(0)
        var = torch.cat([v for _, v, _ in stats]).mean(0)
        second = torch.cat([q for _, _, q in stats]).mean(0)
        out[index] = (mean, second - mean.square() if second_moment else var)
    return out


@pytest.mark.parametrize(
    "name, s", [("torch", 6), ("bn", 2), ("bn", 6), ("brn", 3), ("cbn", 2), ("mabn", 2)]
)
def test_population_statistics_of_every_batch_statistics_norm(name, s):
    options = {} if name == "torch" else {"stat_batch_size": s}
    model = _model(name, **options)
    model.train()
    kalmannorm.set_eval_statistics(model, "moving")
    batches = _batches()
    expected = _expected(model, batches, s, second_moment=name == "mabn")
    untouched = {
        key: value.clone()
        for key, value in model.state_dict().items()
        if not key.endswith(("running_mean", "running_var"))
    }
    momentum = model[1].momentum
    assert update_bn(batches, model) == 5
    for index, (mean, var) in expected.items():
        torch.testing.assert_close(model[index].running_mean, mean)
        torch.testing.assert_close(model[index].running_var, var)
    for key, value in model.state_dict().items():  # windows, clocks, counts, weights
        if key in untouched:
            torch.testing.assert_close(value, untouched[key], msg=key)
    assert model.training and all(m.training for m in model.modules())
    assert model[1].momentum == momentum
    assert getattr(model[1], "eval_statistics", "moving") == "moving"
    if name == "mabn":
        second = expected[1][1] + expected[1][0].square()
        torch.testing.assert_close(model[1].moving_second_moment(), second)


def _cumulative_average(model, batches):
    """What the layers' own moving averages hold with momentum=None over the batches."""
    reference = copy.deepcopy(model).train()
    for layer in reference.modules():
        if hasattr(layer, "num_batches_tracked") and layer.running_mean is not None:
            layer.momentum = None
            layer.num_batches_tracked.zero_()
    with torch.no_grad():
        for x, _ in batches:
            reference(x)
    return reference


@pytest.mark.parametrize("prior", ["learned", "propagate"])
def test_bkn_posterior_statistics_equal_its_own_cumulative_average(prior):
    model = _model("bkn", stat_batch_size=2, prior=prior)
    with torch.no_grad():  # move the Kalman parameters away from their initial values
        for name, parameter in model.named_parameters():
            if "gain" in name or "noise" in name or "transition" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    batches = _batches()
    reference = _cumulative_average(model, batches)
    model.eval()
    update_bn(batches, model)
    assert not model.training
    for index in (1, 4):
        torch.testing.assert_close(model[index].running_mean, reference[index].running_mean)
        torch.testing.assert_close(model[index].running_var, reference[index].running_var)
    # the first layer has no upstream: BatchNorm's population statistics
    expected = _expected(model, batches, 2)
    torch.testing.assert_close(model[1].running_var, expected[1][1])
    # and it is what evaluation then uses
    kalmannorm.set_eval_statistics(model, "moving")
    with torch.no_grad():
        model(batches[0][0])


def test_options_mixed_models_and_errors():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 1),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, track_running_stats=True),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.Dropout(0.5),
    ).double()
    gn_state = copy.deepcopy(model[1].state_dict())
    batches = _batches(4)
    with pytest.warns(UserWarning, match="InstanceNorm2d"):
        assert update_bn(batches, model, num_batches=2, device="cpu") == 2
    torch.testing.assert_close(model[1].weight, gn_state["weight"])
    # two batches through the other layers in eval mode (dropout off, InstanceNorm's own
    # running statistics, which update_bn leaves alone)
    model.eval()
    with torch.no_grad():
        z = torch.cat([model[3](model[2](model[1](model[0](x)))) for x, _ in batches[:2]])
    model.train()
    stats = [z[6 * i : 6 * i + 6].transpose(0, 1).reshape(4, -1) for i in range(2)]
    torch.testing.assert_close(model[4].running_var, torch.stack([p.var(1) for p in stats]).mean(0))
    assert model[4].running_var is not None and model.training
    with pytest.raises(ValueError, match="no batches"):
        update_bn([], nn.Sequential(nn.BatchNorm2d(2)))
    with pytest.raises(ValueError, match="num_batches"):
        update_bn(batches, model, num_batches=0)
    # a batch that does not divide into statistics groups: refused by the layer, state restored
    bkn = kalmannorm.convert_norm(_model("torch"), "bkn", stat_batch_size=4)
    with pytest.raises(ValueError, match="not divisible"):
        update_bn(batches, bkn)
    assert bkn.training and bkn[1].eval_statistics == "auto"
    # gkn has no moving statistics: nothing to do, nothing breaks
    gkn = kalmannorm.convert_norm(_model("torch"), "gkn")
    assert update_bn(batches, gkn) == 4
    assert kalmannorm.update_bn is update_bn


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        model = _model("mabn", stat_batch_size=2)
        kalmannorm.convert_norm(model[:0], "bn")  # (nothing to convert: keeps imports honest)
        batches = _batches(4)[rank::world]
        update_bn(batches, model)
        torch.save(model.state_dict(), f"{folder}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ranks_end_with_the_statistics_of_all_their_batches(tmp_path: Path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    model = _model("mabn", stat_batch_size=2)
    update_bn(_batches(4), model)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(states[0][key], value, msg=key)
            torch.testing.assert_close(states[1][key], value, msg=key)


def test_training_harness_reports_a_precise_bn_column(tmp_path: Path):
    from conftest import tiny

    from kalmannorm.lab.train import train

    summary = train(tiny(tmp_path, norm="mabn", precise_bn_batches=3, steps=6, eval_every=3))
    assert 0.0 <= summary["final"]["test_acc_precise"] <= 1.0
    assert summary["best"]["test_acc_precise"]["step"] in (3, 6)
    assert "precise" in (tmp_path / "metrics.jsonl").read_text()
