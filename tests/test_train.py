"""The training harness in one process: an end-to-end run, configuration files and options,
evaluation with moving and batch statistics, accumulation, schedules and the bad inputs."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import tiny
from torch import nn

import kalmannorm
from kalmannorm.lab.analysis import batch_statistics_mode
from kalmannorm.lab.cli import build_parser, config_from_args, main
from kalmannorm.lab.models import SmallCNN
from kalmannorm.lab.train import (
    CheckpointMismatchError,
    ConfigError,
    load_config,
    plan_batches,
    save_config,
    train,
)
from kalmannorm.lab.train.schedule import lr_factor

TINY_ARGS = [
    "--dataset",
    "digits",
    "--model",
    "small_cnn",
    "--model-option",
    "width=8",
    "--batch-size",
    "16",
    "--steps",
    "12",
    "--eval-every",
    "6",
    "--threads",
    "1",
    "--progress",
    "none",
]


def test_end_to_end_run_writes_the_run_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--steps", "40", "--eval-every", "20", "--progress", "log"]
    code = main(["train", *args, "--norm", "bkn", "--stat-batch-size", "2", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40]
    for key in (
        "epoch",
        "train_loss",
        "train_acc",
        "test_acc_moving",
        "test_acc_batch",
        "lr",
        "samples_per_s",
    ):
        assert key in records[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_acc_moving"] > 0.3  # ten classes: chance is 0.1
    assert summary["derived"]["stat_batch_size_used"] == 2
    assert summary["derived"]["kalmannorm"] == kalmannorm.__version__
    revision = summary["derived"]["source_revision"]  # the checkout's commit (None if installed)
    source = Path(kalmannorm.__file__).parent
    head = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
    )
    assert revision is None or revision.split("+")[0] == head.stdout.strip()
    assert load_config(out / "config.toml") == config_from_args(
        build_parser().parse_args(
            ["train", *args, "--norm", "bkn", "--stat-batch-size", "2", "--out", str(out)]
        )
    )
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 40 and "optimizer" in checkpoint and "rng" in checkpoint
    if importlib.util.find_spec("tensorboard") is not None:
        assert any((out / "tensorboard").iterdir())
    assert "step     20" in capsys.readouterr().out


def test_config_round_trip(tmp_path: Path) -> None:
    config = tiny(
        tmp_path,
        norm_options={"gain": 0.8, "learn_gain": False, "prior": "propagate"},
        milestones=[0.3, 0.9],
        schedule="step",
        data_dir="/some where/with spaces",
        weight_decay=1e-5,
        stat_batch_size=None,
    )
    save_config(config, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == config


def test_options_override_the_config_file(tmp_path: Path) -> None:
    save_config(tiny(tmp_path, lr=0.3, norm_options={"gain": 0.7}), tmp_path / "c.toml")
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(tmp_path / "c.toml"),
            "--lr",
            "0.01",
            "--norm-option",
            "learn_gain=false",
            "--no-augment",
        ]
    )
    config = config_from_args(args)
    assert config.lr == 0.01 and config.batch_size == 16 and not config.augment
    assert config.norm_options == {"gain": 0.7, "learn_gain": False}


def test_unknown_key_in_config_file_lists_valid_keys(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.toml").write_text('datset = "digits"\n')
    assert main(["train", "--config", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert "datset" in err and "dataset" in err and "stat_batch_size" in err


@pytest.mark.parametrize(
    ("option", "value", "listed"),
    [
        ("--dataset", "imagenet42", "fashion_mnist"),
        ("--model", "resnet9000", "preact_resnet32"),
        ("--norm", "xyz", "bkn"),
    ],
)
def test_unknown_names_list_the_valid_ones(tmp_path, capsys, option, value, listed) -> None:
    code = main(["train", *TINY_ARGS, option, value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and repr(value) in err and listed in err
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_missing_data_dir_says_where_it_looked(tmp_path: Path, capsys) -> None:
    args = [
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "none") in err and "train-images-idx3-ubyte" in err


def test_batch_not_dividing_into_statistics_groups_is_refused(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "train",
            *TINY_ARGS,
            "--norm",
            "bkn",
            "--stat-batch-size",
            "3",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2 and "statistics groups of 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_batch_not_dividing_over_processes_is_refused_before_training(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 would
    with pytest.raises(ConfigError, match="does not divide over 3 processes"):
        train(tiny(tmp_path / "run"))  # fails before joining any process group
    assert not (tmp_path / "run").exists()


def test_batch_arithmetic() -> None:
    plan = plan_batches(128, 2, processes=2, accumulation_steps=4)
    assert (plan.per_process, plan.per_pass, plan.stat_batch_size) == (64, 16, 2)
    assert plan.process_slice(1) == slice(64, 128)
    assert plan_batches(128, None, 2).stat_batch_size == 64  # one group per forward pass
    with pytest.raises(ConfigError, match="accumulation"):
        plan_batches(128, 2, processes=1, accumulation_steps=3)
    with pytest.raises(ConfigError, match="--norm none"):
        plan_batches(128, 2, norm="none")


def test_checkpoint_of_another_configuration_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny(out))
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny(out))  # not resuming into a finished run
    with pytest.raises(CheckpointMismatchError) as info:
        train(tiny(out, lr=0.2, stat_batch_size=4), resume=True)
    message = str(info.value)
    assert "lr: 0.05 -> 0.2" in message and "stat_batch_size: 2 -> 4" in message
    # keys that do not change the computation may differ
    summary = train(tiny(out, threads=2, eval_batch_size=7), resume=True)
    assert summary["steps"] == 12


def test_accumulation_gives_the_same_gradient_steps(tmp_path: Path) -> None:
    """Groups never straddle passes, so 2 passes of 8 equal 1 pass of 16 (parameters; the
    moving averages are updated once per pass and so differ)."""
    train(tiny(tmp_path / "one", augment=False))
    train(tiny(tmp_path / "two", augment=False, accumulation_steps=2))
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]
    model = kalmannorm.convert_norm(SmallCNN(1, 10, 8), "bkn", stat_batch_size=2)
    names = [name for name, _ in model.named_parameters()]
    for name in names:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)


def test_plain_batchnorm_baseline_and_batch_free_norm_train(tmp_path: Path) -> None:
    plain = train(tiny(tmp_path / "plain", norm="none", stat_batch_size=None))
    assert plain["derived"]["stat_batch_size_used"] == 16
    gn = train(tiny(tmp_path / "gn", norm="gn", stat_batch_size=2))
    # GroupNorm does not depend on the batch: both evaluation modes compute the same thing
    assert gn["final"]["test_acc_moving"] == gn["final"]["test_acc_batch"]


class _TestSet:
    """``test_batches`` over fixed tensors (what evaluate() reads)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def test_batches(self, batch_size: int):
        for start in range(0, len(self.y), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]

    def evaluate(self, model: nn.Module, stat_batch_size: int, eval_batch_size: int) -> dict:
        """The harness's ``evaluate`` of ``model`` on these tensors, one process, on the CPU."""
        from kalmannorm.lab.train.distributed import Distributed
        from kalmannorm.lab.train.evaluate import evaluate

        return evaluate(
            model,
            self,
            stat_batch_size=stat_batch_size,
            eval_batch_size=eval_batch_size,
            dist=Distributed(),
            device=torch.device("cpu"),
        )


def test_batch_evaluation_scores_whole_groups_only() -> None:

    torch.manual_seed(0)
    model = kalmannorm.convert_norm(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(3)),
        "bn",
        stat_batch_size=4,
    )
    model(torch.randn(4, 1, 6, 6))  # materialise the lazy layer
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    model.eval()
    with torch.no_grad():
        moving = (model(x).argmax(1) == y).float().mean().item()
        with batch_statistics_mode(model):  # groups of 4: the first 8 samples are scored
            batch = (model(x[:8]).argmax(1) == y[:8]).float().mean().item()
    # batches of 4 (the largest multiple of 4 up to 6): 4, 4 and 2 (left out)
    result = _TestSet(x, y).evaluate(model, stat_batch_size=4, eval_batch_size=6)
    assert result == {
        "test_acc_moving": pytest.approx(moving),
        "test_acc_batch": pytest.approx(batch),
    }


def test_moving_column_uses_moving_statistics_with_one_sample_groups() -> None:
    """At s = 1 a layer's default eval mode ("auto") takes each sample's own statistics; the
    moving column must still be the moving statistics', and the default stays."""

    torch.manual_seed(0)
    model = kalmannorm.convert_norm(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 3)),
        "bn",
        stat_batch_size=1,
    )
    model(torch.randn(4, 1, 6, 6) + 3.0)  # moving statistics far from the test inputs'
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    model.eval()
    with torch.no_grad():
        own = model(x).argmax(1)
        kalmannorm.set_eval_statistics(model, "moving")
        moving = model(x).argmax(1)
        kalmannorm.set_eval_statistics(model, "auto")
    assert not torch.equal(own, moving)
    result = _TestSet(x, y).evaluate(model, stat_batch_size=1, eval_batch_size=16)
    assert result == {
        "test_acc_moving": pytest.approx((moving == y).float().mean().item()),
        "test_acc_batch": pytest.approx((own == y).float().mean().item()),
    }
    assert model[1].eval_statistics == "auto"


def _small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )


def test_batch_statistics_of_plain_batchnorm_is_the_training_forward() -> None:
    model = _small_model()
    x = torch.randn(8, 1, 9, 9)
    model.train()
    model(torch.randn(8, 1, 9, 9))  # non-trivial moving averages
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = torch.nn.functional.batch_norm(
        model[0](x), None, None, model[1].weight, model[1].bias, training=True
    )
    model.eval()
    with torch.no_grad(), batch_statistics_mode(model) as layers:
        out = model[1](model[0](x))
    torch.testing.assert_close(out, reference)
    assert [(layer.name, layer.group_size) for layer in layers] == [("1", None), ("4", None)]
    assert not model[1].training and model[1].momentum == 0.1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # evaluation changed nothing


def test_batch_statistics_switches_layers_with_eval_statistics() -> None:
    model = kalmannorm.convert_norm(_small_model(), "bkn", stat_batch_size=2)
    model.eval()
    x = torch.randn(8, 1, 9, 9)
    with torch.no_grad():
        moving = model(x)
        with batch_statistics_mode(model) as layers:
            batch = model(x)
            first_groups = model(x[:2])
        again = model(x)
    assert [(layer.name, layer.group_size) for layer in layers] == [("1", 2), ("4", 2)]
    assert not torch.allclose(moving, batch) and torch.equal(moving, again)
    torch.testing.assert_close(batch[:2], first_groups)  # statistics per group of 2
    assert all(
        m.eval_statistics == "auto" for m in model.modules() if hasattr(m, "eval_statistics")
    )


def test_learning_rate_schedules() -> None:
    cosine = [lr_factor(s, total_steps=10, schedule="cosine", warmup_steps=2) for s in range(10)]
    assert cosine[:2] == [0.5, 1.0] and cosine[2] == 1.0 and cosine[-1] < 0.05
    assert all(a >= b for a, b in itertools.pairwise(cosine[1:]))
    step = [lr_factor(s, total_steps=10, schedule="step", milestones=(0.5, 0.8)) for s in range(10)]
    assert step == pytest.approx([1] * 5 + [0.1] * 3 + [0.01] * 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, total_steps=10, schedule="linear")


def test_center_weights_centres_every_convolution_of_the_run(tmp_path: Path) -> None:
    from kalmannorm.baselines import CenteredConv2d
    from kalmannorm.lab.analysis.run import load_run

    config = tiny(tmp_path / "mabn", norm="mabn", center_weights=True)
    summary = train(config)
    assert summary["config"]["center_weights"] is True
    model = load_run(config.out).model  # rebuilt as the run built it: centred again
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is CenteredConv2d for m in convs)
    x = torch.randn(2, convs[0].in_channels, 8, 8)
    weight = convs[0].weight
    centred = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
    expected = nn.functional.conv2d(x, centred, convs[0].bias, convs[0].stride, convs[0].padding)
    torch.testing.assert_close(convs[0](x), expected)
    # the default leaves the model's convolutions alone
    plain = load_run(train(tiny(tmp_path / "plain", norm="mabn"))["config"]["out"]).model
    assert not any(isinstance(m, CenteredConv2d) for m in plain.modules())


def test_compile_steps_trains_the_run_of_the_written_steps(tmp_path: Path) -> None:
    plain = train(tiny(tmp_path / "plain", norm="bkn-flow"))
    compiled = train(tiny(tmp_path / "compiled", norm="bkn-flow", compile_steps=True))
    for key in ("test_acc_moving", "test_acc_batch"):
        assert compiled["final"][key] == pytest.approx(plain["final"][key], abs=1e-9)
    assert compiled["final"]["train_loss"] == pytest.approx(plain["final"]["train_loss"], rel=1e-4)
    with pytest.raises(ConfigError, match="compile_steps: .*no Kalman layer"):
        train(tiny(tmp_path / "bn", norm="none", stat_batch_size=None, compile_steps=True))
