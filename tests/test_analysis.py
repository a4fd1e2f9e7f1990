"""The analysis library: every number checked against a direct computation on a known case."""

import copy
import sys

import pytest
import torch
from conftest import conv_bn_stack, randomize_kalman
from torch import nn
from torch.nn import functional as torch_f

import kalmannorm
from kalmannorm.lab import analysis
from kalmannorm.lab.analysis.batches import iterate_batches
from kalmannorm.lab.models import SmallCNN
from kalmannorm.layers.batch_kalman import BatchKalmanNorm

DTYPE = torch.float64


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def single_bn(channels: int = 3) -> nn.Sequential:
    """One BatchNorm2d with known, non-trivial moving statistics and affine parameters."""
    bn = nn.BatchNorm2d(channels).to(DTYPE)
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-0.5, 0.5, channels))
        bn.running_var.copy_(torch.linspace(0.5, 2.0, channels))
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return nn.Sequential(bn)


def classifier_stack(
    norm: str | None = None, widths: tuple[int, ...] = (3, 4, 5, 2), **options
) -> nn.Sequential:
    """conv-norm stack (3 -> 4 -> 5 -> 2 channels) + average pool: a tiny 2-class classifier."""
    model = nn.Sequential(conv_bn_stack(widths), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if norm is not None:
        model = kalmannorm.convert_norm(model, norm, **options)
    return model


def warm_up(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """A few training-mode forwards, so the moving statistics are not the initial ones."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    model.eval()


# -- data iteration and population moments -------------------------------------------------------


def test_iterate_batches_accepts_every_source_and_keeps_whole_groups():
    x, y = torch.arange(11.0).unsqueeze(1), torch.arange(11)
    sizes = [len(b[0]) for b in iterate_batches(x, 4, multiple_of=2)]
    assert sizes == [4, 4, 2]
    pairs = list(iterate_batches((x, y), 5, multiple_of=2))  # batch rounded down to 4
    assert [len(b[0]) for b in pairs] == [4, 4, 2] and torch.equal(pairs[0][1], y[:4])
    dataset = torch.utils.data.TensorDataset(x, y)
    assert [len(b[0]) for b in iterate_batches(dataset, 3, multiple_of=3)] == [3, 3, 3]
    called = list(iterate_batches(lambda n: [(x[:n], y[:n])], 6, multiple_of=4))
    assert [len(b[0]) for b in called] == [4]
    assert [len(b[0]) for b in iterate_batches(x, 4, max_samples=6)] == [4, 2]
    assert [len(b[0]) for b in iterate_batches(x, 4, multiple_of=4, max_samples=7)] == [4]
    assert all(labels is None for _, labels in iterate_batches(x, 4))


def test_population_moments_equal_var_mean_over_all_values():
    values = torch.randn(3, 101, dtype=DTYPE) * torch.tensor([[1.0], [5.0], [0.1]]) + 7.0
    moments = analysis.PopulationMoments()
    for chunk in values.split([1, 40, 7, 53], dim=1):
        moments.update(chunk)
    var, mean = torch.var_mean(values, dim=1, correction=0)
    torch.testing.assert_close(moments.mean, mean)
    torch.testing.assert_close(moments.var, var)
    assert moments.count == 101


# -- statistics, variance gap and estimation error on a single BatchNorm ------------------------


def test_single_batchnorm_statistics_gap_and_error_by_hand():
    model = single_bn().train()
    before = state_of(model)
    x = torch.randn(12, 3, 2, 2, dtype=DTYPE) * 2 + 1
    stats = analysis.collect_statistics(model, x, stat_batch_size=2, batch_size=4)
    assert_same_state(model, before)
    assert model.training and model[0].training
    layer = stats["0"]
    assert (layer.kind, layer.group_size, layer.count, layer.samples) == ("batchnorm", 2, 8, 12)
    # Groups of 2 consecutive samples: 6 groups over the data set.
    group_var, group_mean = torch.var_mean(x.view(6, 2, 3, 2, 2), dim=(1, 3, 4), correction=0)
    torch.testing.assert_close(layer.batch_mean, group_mean)
    torch.testing.assert_close(layer.batch_var, group_var)
    torch.testing.assert_close(layer.var, group_var)
    pop_var, pop_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(layer.population_mean, pop_mean)
    torch.testing.assert_close(layer.population_var, pop_var)
    assert layer.gain is None

    running_var = model[0].running_var
    gap = analysis.variance_gaps(stats)["0"]
    assert gap.gap.shape == (3, 6)
    relative = (group_var.T - running_var[:, None]) / running_var[:, None]
    torch.testing.assert_close(gap.relative, relative)
    torch.testing.assert_close(gap.gap, group_var.T - running_var[:, None])
    assert gap.summary == pytest.approx(float(relative.abs().mean()))
    assert analysis.variance_gap_summary({"0": gap}) == {"0": gap.summary}

    row = analysis.layer_estimation_error(layer)
    expected_mean = ((group_mean - pop_mean).abs() / pop_var.sqrt()).mean()
    expected_var = ((group_var - pop_var).abs() / pop_var).mean()
    assert row["mean_error"] == pytest.approx(float(expected_mean))
    assert row["var_error"] == pytest.approx(float(expected_var))
    assert row["batch_var_error"] == row["var_error"]  # BatchNorm normalises with its batch


def test_estimation_error_sweep_over_statistics_batch_sizes():
    model = single_bn().eval()
    x = torch.randn(16, 3, 2, 2, dtype=DTYPE)
    table = analysis.measure_estimation_error(model, (x,), (2, 4), batch_size=8, eps=1e-3)
    assert [r["stat_batch_size"] for r in table.rows] == [2, 4]
    assert [o["stat_batch_size"] for o in table.overall] == [2, 4]
    pop_var, pop_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    group_var, group_mean = torch.var_mean(x.view(4, 4, 3, 2, 2), dim=(1, 3, 4), correction=0)
    expected = ((group_var - pop_var).abs() / (pop_var + 1e-3)).mean()
    assert table.rows[1]["var_error"] == pytest.approx(float(expected))
    expected = ((group_mean - pop_mean).abs() / (pop_var + 1e-3).sqrt()).mean()
    assert table.overall[1]["mean_error"] == pytest.approx(float(expected))
    # Larger statistics groups estimate the population better.
    assert table.rows[1]["var_error"] < table.rows[0]["var_error"]


def test_single_value_groups_are_refused_and_layer_names_checked():
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="single value"):
        analysis.collect_statistics(model, torch.randn(4, 3), stat_batch_size=1)
    with pytest.raises(ValueError, match="no normalization layer named"):
        analysis.collect_statistics(model, torch.randn(4, 3), layers=["nope"])
    with pytest.raises(ValueError, match="no BatchNorm-like"):
        analysis.collect_statistics(nn.Linear(3, 3), torch.randn(4, 3))


# -- batch-statistics mode ----------------------------------------------------------------------


def test_batch_mode_of_batchnorm_equals_bkn_with_unit_gain():
    """BatchNorm per statistics group through hooks == the documented conversion to q = 1 BKN."""
    model = classifier_stack()
    x = torch.randn(8, 3, 5, 5, dtype=DTYPE)
    warm_up(model, x)
    before = state_of(model)
    reference = kalmannorm.convert_norm(
        copy.deepcopy(model), "bkn", stat_batch_size=2, gain=1.0, learn_gain=False
    )
    kalmannorm.set_eval_statistics(reference, "batch")
    with torch.no_grad():
        expected = reference.eval()(x)
        with analysis.batch_statistics_mode(model, 2) as layers:
            got = model(x)
        moving = model(x)
    assert len(layers) == 3 and all(layer.kind == "batchnorm" for layer in layers)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(moving, got)  # outside the block: moving statistics again
    assert_same_state(model, before)


def test_bkn_statistics_equal_the_training_forward_posterior():
    torch.manual_seed(1)
    model = classifier_stack("bkn", stat_batch_size=2)
    randomize_kalman(model)
    x = torch.randn(8, 3, 5, 5, dtype=DTYPE)
    warm_up(model, x)
    before = state_of(model)
    stats = analysis.collect_statistics(model, (x,), batch_size=4)
    assert_same_state(model, before)
    bkn = [m for m in model.modules() if isinstance(m, BatchKalmanNorm)]
    assert all(m.eval_statistics == "auto" and m.stat_batch_size == 2 for m in bkn)
    assert not model.training

    # Reference: the training-mode forward of a copy, batch by batch (same groups, same math).
    copy_model = copy.deepcopy(model).train()
    inputs: dict[str, list[torch.Tensor]] = {}
    posterior: dict[str, list] = {}
    names = {m: n for n, m in copy_model.named_modules()}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a: inputs.setdefault(names[mod], []).append(a[0]))
        for m in copy_model.modules()
        if isinstance(m, BatchKalmanNorm)
    ]
    with torch.no_grad():
        for batch in x.split(4):
            copy_model(batch)
            for name, s in kalmannorm.kalman_statistics(copy_model).items():
                posterior.setdefault(name, []).append(s)
    for hook in hooks:
        hook.remove()
    assert list(stats) == list(posterior)
    for name, layer in stats.items():
        assert layer.kind == "bkn" and layer.mean.shape == (4, layer.width)
        for field in ("posterior_mean", "posterior_var", "batch_mean", "batch_var", "gain"):
            expected = torch.cat([getattr(s, field) for s in posterior[name]])
            attribute = {"posterior_mean": "mean", "posterior_var": "var"}.get(field, field)
            torch.testing.assert_close(getattr(layer, attribute), expected)
        pop_var, pop_mean = torch.var_mean(torch.cat(inputs[name]), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(layer.population_mean, pop_mean)
        torch.testing.assert_close(layer.population_var, pop_var)
        torch.testing.assert_close(layer.running_var, dict(model.named_modules())[name].running_var)
    # The first layer has no upstream: its posterior is its batch (q = 1).
    first = stats[next(iter(stats))]
    torch.testing.assert_close(first.var, first.batch_var)
    assert bool((first.gain == 1).all())
    # The posterior variance of the other layers is not the batch variance.
    last = stats[list(stats)[-1]]
    assert not torch.allclose(last.var, last.batch_var)


def test_statistics_batch_size_override_and_layer_selection():
    model = classifier_stack("bkn", stat_batch_size=2)
    x = torch.randn(8, 3, 4, 4, dtype=DTYPE)
    stats = analysis.collect_statistics(model, x, stat_batch_size=4, batch_size=8, layers=["0.4"])
    assert list(stats) == ["0.4"]
    assert stats["0.4"].groups == 2 and stats["0.4"].group_size == 4
    assert stats["0.4"].count == 4 * 16
    assert all(m.stat_batch_size == 2 for m in model.modules() if isinstance(m, BatchKalmanNorm))


def test_group_kalman_statistics_per_sample_and_channel_group():
    model = classifier_stack(
        "gkn", (3, 4, 6, 2), num_groups=2, example_input=torch.zeros(2, 3, 4, 4, dtype=DTYPE)
    )
    x = torch.randn(6, 3, 4, 4, dtype=DTYPE)
    captured = []
    first = model[0][1]
    hook = first.register_forward_pre_hook(lambda mod, a: captured.append(a[0]))
    stats = analysis.collect_statistics(model, x, batch_size=3)
    hook.remove()
    layer = stats["0.1"]
    assert (layer.kind, layer.units, layer.group_size) == ("gkn", "channel group", 1)
    inputs = torch.cat(captured).unflatten(1, (2, 2))  # 4 channels in 2 groups
    var, mean = torch.var_mean(inputs, dim=(2, 3, 4), correction=0)  # per sample and group
    torch.testing.assert_close(layer.batch_mean, mean)
    torch.testing.assert_close(layer.var, var)  # first layer: GroupNorm's statistics
    pop_var, pop_mean = torch.var_mean(inputs, dim=(0, 2, 3, 4), correction=0)
    torch.testing.assert_close(layer.population_mean, pop_mean)
    torch.testing.assert_close(layer.population_var, pop_var)
    assert analysis.variance_gaps(stats) == {}  # no moving variance to compare with
    assert len(analysis.estimation_error_table(stats).rows) == 3


# -- accuracy with moving and batch statistics -------------------------------------------------


def test_eval_mode_accuracy_of_a_batchnorm_classifier_by_hand():
    torch.manual_seed(2)
    bn = nn.BatchNorm1d(3).to(DTYPE)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -0.5, 0.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, -0.1]))
    model = nn.Sequential(bn).train()
    x = torch.randn(20, 3, dtype=DTYPE)
    y = torch.randint(0, 3, (20,))
    eps = bn.eps

    def logits_moving(z):
        return (z - bn.running_mean) / (bn.running_var + eps).sqrt() * bn.weight + bn.bias

    def logits_groups(z, s):
        groups = z.view(-1, s, 3)
        var, mean = torch.var_mean(groups, dim=1, correction=0, keepdim=True)
        return ((groups - mean) / (var + eps).sqrt() * bn.weight + bn.bias).view(-1, 3)

    def acc(logits, labels):
        return float((logits.argmax(1) == labels).double().mean())

    with torch.no_grad():
        result = analysis.eval_mode_accuracy(model, (x, y), stat_batch_size=3, batch_size=6)
        # 3 full batches of 6 (groups of 3); the last 2 samples fill no group in batch mode.
        assert (result.moving_samples, result.batch_samples) == (20, 18)
        assert result.moving == pytest.approx(acc(logits_moving(x), y))
        assert result.batch == pytest.approx(acc(logits_groups(x[:18], 3), y[:18]))
        assert model.training  # restored

        # Labels equal to the moving-statistics predictions: accuracy exactly 1.
        known = logits_moving(x).argmax(1)
        pairs = analysis.eval_mode_accuracy(model, (x, known), stat_batch_size=2, batch_size=4)
        assert pairs.moving == 1.0
        assert pairs.batch == pytest.approx(acc(logits_groups(x, 2), known))
        assert pairs.batch < 1.0

        # No statistics-batch size: plain BatchNorm takes each whole (full) batch as its group.
        whole = analysis.eval_mode_accuracy(model, (x, y), batch_size=5)
        assert whole.batch_samples == 20
        assert whole.batch == pytest.approx(acc(logits_groups(x, 5), y))


def test_eval_mode_accuracy_of_a_bkn_classifier_matches_set_eval_statistics():
    torch.manual_seed(3)
    model = classifier_stack("bkn", stat_batch_size=2)
    randomize_kalman(model)
    x = torch.randn(12, 3, 4, 4, dtype=DTYPE)
    y = torch.randint(0, 2, (12,))
    warm_up(model, x[:4])
    before = state_of(model)
    result = analysis.eval_mode_accuracy(model, (x, y), batch_size=4)
    assert_same_state(model, before)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        moving = (reference(x).argmax(1) == y).double().mean()
        kalmannorm.set_eval_statistics(reference, "batch")
        batch = torch.cat([reference(b).argmax(1) for b in x.split(4)])
    assert result.moving == pytest.approx(float(moving))
    assert result.batch == pytest.approx(float((batch == y).double().mean()))
    assert result.stat_batch_size is None and result.batch_samples == 12
    assert all(
        m.eval_statistics == "auto" for m in model.modules() if isinstance(m, BatchKalmanNorm)
    )


# -- parameters ---------------------------------------------------------------------------------


def test_parameter_counts_of_bn_and_bkn_networks():
    bn = classifier_stack()
    bkn = classifier_stack("bkn", stat_batch_size=2, flow="execution")
    # Layers of 4, 5, 2 channels; the 2nd and 3rd have A (C_k x C_{k-1}), R and q.
    kalman = (5 * 4 + 2 * 5) + (2 * 5 + 2 * 2)
    count = analysis.parameter_count(bkn)
    assert count.kalman == kalman
    # on a data flow the transition is diagonal: a, R and q per channel
    data_flow = classifier_stack("bkn", stat_batch_size=2)
    assert analysis.parameter_count(data_flow).kalman == 3 * 5 + 3 * 2
    assert count.norm == 2 * (4 + 5 + 2) + kalman
    assert count.total == sum(p.numel() for p in bn.parameters()) + kalman
    assert analysis.count_parameters(bn) == count.total - kalman
    rows = analysis.compare_parameters({"BN": bn, "BKN": bkn}, "BN")
    assert rows[0]["extra"] == 0 and rows[1]["extra"] == kalman
    assert rows[1]["ratio"] == pytest.approx(count.total / (count.total - kalman))
    group_norm = analysis.parameter_count(classifier_stack("gn", num_groups=1))
    assert (group_norm.norm, group_norm.kalman) == (2 * (4 + 5 + 2), 0)
    frozen = classifier_stack()
    frozen[0][0].weight.requires_grad_(False)
    assert analysis.count_parameters(frozen, trainable_only=True) == (
        analysis.count_parameters(bn) - frozen[0][0].weight.numel()
    )


def test_width_search_returns_the_smallest_width_reaching_the_target():
    built = []

    def build(width: int) -> nn.Module:
        built.append(width)
        return SmallCNN(1, 10, width=width)

    counts = {w: analysis.count_parameters(SmallCNN(1, 10, width=w)) for w in range(1, 12)}
    for target in (counts[3] + 1, counts[7], counts[7] - 1, counts[10] + 5):
        built.clear()
        match = analysis.width_for_parameter_count(build, target)
        smallest = min(w for w, c in counts.items() if c >= target)
        assert match.width == smallest and match.parameters == counts[smallest]
        assert match.parameters_below == counts[smallest - 1]
        assert len(set(built)) <= 8  # doubling + bisection, not a scan
        below, above = target - counts[smallest - 1], counts[smallest] - target
        assert match.closest_width == (smallest - 1 if below < above else smallest)
    match = analysis.width_for_parameter_count(build, counts[2], low=2)
    assert (match.width, match.parameters_below) == (2, None)
    with pytest.raises(ValueError, match="no width up to 4"):
        analysis.width_for_parameter_count(build, counts[10], max_width=4)


# -- gain ---------------------------------------------------------------------------------------


def test_gain_snapshot_equals_the_layers_parameters(tmp_path):
    model = classifier_stack("bkn", stat_batch_size=2)
    randomize_kalman(model)
    snapshot = analysis.gain_snapshot(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BatchKalmanNorm)}
    assert list(snapshot) == list(layers)[1:]  # the first layer has no upstream, no gain
    for name, entry in snapshot.items():
        layer = layers[name]
        torch.testing.assert_close(entry.gain, torch.sigmoid(layer.gain_logit).detach())
        assert entry.transition_norm == pytest.approx(
            float(torch.linalg.norm(layer.transition.detach()))
        )
        assert entry.noise_mean == pytest.approx(
            float(torch_f.softplus(layer.noise_raw.detach()).mean())
        )
    from_state = analysis.gain_snapshot({"model": model.state_dict(), "step": 3})
    assert from_state.keys() == snapshot.keys()
    for name in snapshot:
        torch.testing.assert_close(from_state[name].gain, snapshot[name].gain)

    paths = []
    for step in (20, 10):
        with torch.no_grad():
            layers["0.4"].gain_logit.fill_(float(step) / 10)
        paths.append(tmp_path / f"step{step}.pt")
        torch.save({"model": model.state_dict(), "step": step}, paths[-1])
    history = analysis.gain_snapshots_from_checkpoints(paths)
    assert [step for step, _ in history] == [10.0, 20.0]
    assert float(history[0][1]["0.4"].gain.mean()) == pytest.approx(
        float(torch.sigmoid(torch.tensor(1.0)))
    )
    rows = analysis.gain_history_rows(history)
    assert len(rows) == 4 and rows[0]["step"] == 10.0 and "q_mean" in rows[0]

    fixed = classifier_stack("bkn", stat_batch_size=2, gain=0.3, learn_gain=False)
    assert all(
        torch.allclose(e.gain, torch.full_like(e.gain, 0.3))
        for e in analysis.gain_snapshot(fixed).values()
    )


# -- plots and Markdown ------------------------------------------------------------------------


def _is_png(path) -> bool:
    return path.stat().st_size > 100 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_writers(tmp_path):
    pytest.importorskip("matplotlib")
    model = classifier_stack("bkn", stat_batch_size=2)
    randomize_kalman(model)
    x = torch.randn(8, 3, 4, 4, dtype=DTYPE)
    warm_up(model, x)
    gaps = analysis.measure_variance_gap(model, x, batch_size=8)
    assert _is_png(analysis.write_variance_gap_heatmap(gaps, tmp_path / "gap.png", title="BKN"))
    snapshot = analysis.gain_snapshot(model)
    assert _is_png(analysis.write_gain_distribution_plot(snapshot, tmp_path / "q" / "q.png"))
    history = [(0.0, snapshot), (5.0, snapshot)]
    assert _is_png(analysis.write_gain_history_plot(history, tmp_path / "history.png"))


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch, tmp_path):
    gap = analysis.VarianceGap(
        "x", "batchnorm", torch.ones(2), torch.zeros(2, 3), torch.zeros(2, 3)
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        analysis.write_variance_gap_heatmap({"x": gap}, tmp_path / "gap.png")


def test_markdown_tables():
    rows = [{"name": "a|b", "value": 0.123456, "n": 3}, {"name": "c", "value": None, "n": 10}]
    assert analysis.markdown_table(rows, headers={"n": "count"}) == (
        "| name | value | count |\n|:---|---:|---:|\n| a\\|b | 0.1235 | 3 |\n| c | \u2013 | 10 |"
    )
    gap = analysis.VarianceGap(
        "bn1", "batchnorm", torch.ones(1), torch.zeros(1, 2), torch.tensor([[0.5, -0.25]])
    )
    text = analysis.variance_gap_markdown({"BN": {"bn1": gap}, "BKN": {}})
    assert "| bn1 | 0.3750 | \u2013 |" in text and "| **mean** | 0.3750 | \u2013 |" in text
    result = analysis.EvalModeAccuracy(0.9, 0.8, 100, 96, 2)
    assert "| BKN | 2 | 0.9000 | 0.8000 | 100 | 96 |" in analysis.eval_modes_markdown(
        {"BKN": result}
    )
    table = analysis.measure_estimation_error(
        single_bn().eval(), torch.randn(8, 3, 2, 2, dtype=DTYPE), (2,)
    )
    overall = analysis.estimation_error_markdown({"BN": table})
    assert overall.splitlines()[0].startswith("| norm | stat batch | layers |")
    assert len(analysis.estimation_error_markdown(table, per_layer=True).splitlines()) == 3
