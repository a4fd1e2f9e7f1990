"""``holdout``: a held-out part of the training set is the evaluation set of hyper-parameter
searches (issue 14). It is disjoint from what trains, the same for every run and seed, and the
test set is never read; the summary and the compare table say the numbers are validation ones."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny

from kalmannorm.lab.data import TensorImageData
from kalmannorm.lab.data.holdout import HOLDOUT_SEED, HoldoutData, holdout_indices
from kalmannorm.lab.train import ConfigError, train
from kalmannorm.lab.train.config import check_values
from kalmannorm.lab.train.model import load_run_data


@pytest.mark.parametrize(
    ("n", "fraction", "size"), [(100, 0.1, 10), (1437, 0.1, 144), (3, 0.01, 1)]
)
def test_the_split_is_disjoint_complete_and_fixed(n, fraction, size) -> None:
    kept, held = holdout_indices(n, fraction)
    assert len(held) == size and len(kept) == n - size
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert torch.equal(torch.cat([kept, held]).sort().values, torch.arange(n))
    again = holdout_indices(n, fraction)
    assert torch.equal(again[0], kept) and torch.equal(again[1], held)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(holdout_indices(n, fraction)[1], held)
    assert HOLDOUT_SEED == 14


def test_every_run_seed_holds_out_the_same_images(tmp_path) -> None:
    splits = [load_run_data(tiny(tmp_path, holdout=0.1, seed=seed)) for seed in (0, 1, 7)]
    for data in splits:
        assert isinstance(data, HoldoutData) and data.eval_set == "holdout"
        assert torch.equal(data.holdout_indices, splits[0].holdout_indices)
    assert splits[0].test_size == 144 and splits[0].train_size == 1437 - 144


def test_the_holdout_is_training_images_and_training_never_sees_them(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 1, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.arange(50) % 5
    base = TensorImageData("toy", x, y, x[:10] * 0, y[:10], 5)
    data = HoldoutData(base, 0.2)
    held = data.holdout_indices
    images, labels = zip(*data.test_batches(4))
    assert torch.equal(torch.cat(labels), y[held])
    expected, _ = base.train_batch(held, 0, augment=False)
    torch.testing.assert_close(torch.cat(images), expected)
    # training positions 0..39 are the kept images
    seen = torch.cat([yb for _, yb in data.train_batches([(torch.arange(40), 5)], slice(None))])
    assert torch.equal(seen, y[data.train_indices])
    ordered = torch.cat([yb for _, yb in data.train_batches_in_order(16)])
    assert torch.equal(ordered, y[data.train_indices])


def test_a_holdout_run_never_reads_the_test_set_and_says_so(tmp_path, monkeypatch, capsys):
    def forbidden(self, batch_size):
        raise AssertionError("the test set was read")

    read = []
    train_batch = TensorImageData.train_batch

    def recorded(self, indices, seed, part=slice(None), augment=True):
        read.append((indices[part].clone(), augment))
        return train_batch(self, indices, seed, part, augment)

    monkeypatch.setattr(TensorImageData, "test_batches", forbidden)
    monkeypatch.setattr(TensorImageData, "train_batch", recorded)
    config = tiny(tmp_path, holdout=0.1, norm="bkn", steps=6, eval_every=3, progress="log")
    config.precise_bn_batches = 2
    summary = train(config)
    assert summary["eval_set"] == "holdout" and summary["config"]["holdout"] == 0.1
    assert summary["derived"]["test_size"] == 144 and summary["derived"]["train_size"] == 1293
    assert 0 <= summary["final"]["test_acc_moving"] <= 1
    held = set(load_run_data(config).holdout_indices.tolist())
    trained = {i for indices, augment in read if augment for i in indices.tolist()}
    assert trained and trained.isdisjoint(held)  # no training step saw a held-out image
    evaluated = {i for indices, augment in read if not augment for i in indices.tolist()}
    assert held <= evaluated
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["eval_set"] == "holdout" for r in records)
    out = capsys.readouterr().out
    assert "144 held out for evaluation (the test set is not used)" in out
    assert "holdout acc moving" in out and "done: holdout accuracy" in out


def test_bad_holdout_values_are_refused(tmp_path) -> None:
    for value in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="holdout must be a fraction"):
            check_values(tiny(tmp_path, holdout=value))
    with pytest.raises(ConfigError, match="test_subset has no effect with holdout"):
        check_values(tiny(tmp_path, holdout=0.1, test_subset=100))
    check_values(tiny(tmp_path, holdout=0.0, test_subset=100))


def test_holdout_from_the_command_line_and_compare(tmp_path, capsys) -> None:
    from kalmannorm.lab.cli import build_parser, config_from_args, main

    args = build_parser().parse_args(["train", "--holdout", "0.2", "--out", str(tmp_path)])
    assert config_from_args(args).holdout == 0.2
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f"""
[compare]
out = "{tmp_path / "grid"}"
norms = ["bkn"]
stat_batch_sizes = [2]
baseline = "none"

[train]
dataset = "digits"
model_options = {{width = 8}}
batch_size = 16
steps = 4
eval_every = 4
lr = 0.05
holdout = 0.1
"""
    )
    assert main(["compare", "--config", str(grid)]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "grid" / "summary.md").read_text()
    assert table.startswith("| norm | stat batch | seeds | final holdout acc % (moving)")
    assert "validation numbers, not test ones" in printed
    assert "holdout acc moving" in printed
    csv = (tmp_path / "grid" / "summary.csv").read_text().splitlines()
    assert csv[0].endswith(",eval_set") and all(line.endswith(",holdout") for line in csv[1:])


def test_a_resumed_run_keeps_its_holdout(tmp_path) -> None:
    from kalmannorm.lab.train import CheckpointMismatchError

    config = tiny(tmp_path, holdout=0.1, steps=4, eval_every=2)
    train(dataclasses.replace(config, steps=2))
    (tmp_path / "summary.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="holdout: 0.1 -> 0.2"):
        train(dataclasses.replace(config, holdout=0.2), resume=True)


# -- [search]: the same small grid for every norm, on the holdout --------------------------------

SEARCH_GRID = """
[compare]
out = "{out}"
norms = ["bn", "gn"]
stat_batch_sizes = [2]
baseline = ""

[train]
dataset = "digits"
model_options = {{width = 8}}
batch_size = 16
steps = 4
eval_every = 4
lr = 0.05
test_subset = 100

[search]
holdout = 0.2
train = {{lr = [0.01, 0.05]}}
options = {{gn = {{num_groups = [1, 2]}}}}
"""


def test_search_points_and_its_grid_on_the_holdout(tmp_path) -> None:
    import tomllib

    from kalmannorm.lab.train.compare import compare_config_from_dict, make_search_grid
    from kalmannorm.lab.train.search import pick

    values = tomllib.loads(SEARCH_GRID.format(out=tmp_path))
    cfg = compare_config_from_dict(values)
    assert [p.name for p in cfg.search.points("bn")] == ["lr=0.01", "lr=0.05"]
    assert [p.name for p in cfg.search.points("gn")][1] == "lr=0.01 num_groups=2"
    runs = make_search_grid(cfg)
    assert len(runs) == 2 + 4  # bn: 2 points; gn: 2 x 2
    for run in runs:
        assert run.spec.config.holdout == 0.2 and run.spec.config.test_subset is None
        assert run.spec.folder.parent == tmp_path / "search"
        assert run.spec.config.lr == run.point.train["lr"]
    gn = [r for r in runs if r.group == ("gn", None)]
    assert [r.spec.config.norm_options for r in gn][1] == {"num_groups": 2}
    assert compare_config_from_dict(tomllib.loads(cfg.to_toml())).search == cfg.search
    assert pick([[0.5], [0.7, 0.7], [0.7], []]) == 1 and pick([[], []]) is None
    bad = {
        "train": ({"seed": [1, 2]}, "cannot vary"),
        "options": ({"bkn": {"gain": [0.5]}}, "no such norm entry"),
        "holdout": (1.0, "a fraction in"),
    }
    for key, (value, message) in bad.items():
        broken = {**values, "search": {**values["search"], key: value}}
        with pytest.raises(ConfigError, match=message):
            compare_config_from_dict(broken)


def test_compare_searches_every_norm_on_the_holdout_then_tests_the_pick(tmp_path, capsys):
    import tomllib

    from kalmannorm.lab.cli import main

    grid = tmp_path / "grid.toml"
    grid.write_text(
        SEARCH_GRID.format(out=tmp_path / "grid")
        .replace('norms = ["bn", "gn"]', 'norms = ["bn"]')
        .replace("options = {gn = {num_groups = [1, 2]}}\n", "")
    )
    assert main(["compare", "--config", str(grid)]) == 0
    printed = capsys.readouterr().out
    search = (tmp_path / "grid" / "search.md").read_text()
    assert search.count("**yes**") == 1 and "held-out 20% of the training set" in search
    for folder in (tmp_path / "grid" / "search").iterdir():
        assert json.loads((folder / "summary.json").read_text())["eval_set"] == "holdout"
    picked = (
        0.01
        if "| bn | 2 | lr=0.01 |" in next(line for line in search.splitlines() if "**yes**" in line)
        else 0.05
    )
    # the recipe's lr is 0.05: that pick reuses the plain folder, another gets its own
    folder = "bn-s2-seed0" if picked == 0.05 else "bn-s2-lr_0.01-seed0"
    assert [f.name for f in (tmp_path / "grid").glob("bn-s2-*")] == [folder]
    final = json.loads((tmp_path / "grid" / folder / "summary.json").read_text())
    assert final["eval_set"] == "test" and final["config"]["lr"] == picked
    assert final["derived"]["test_size"] == 100  # the grid itself is tested on the test set
    assert f"Picked: bn (s=2) lr={picked}" in printed
    assert "final acc % (moving)" in (tmp_path / "grid" / "summary.md").read_text()
    # the report reads the same picks back from the search runs' files
    from kalmannorm.lab.reproduce.evidence import collect_cells
    from kalmannorm.lab.train.compare import compare_config_from_dict

    cfg = compare_config_from_dict(tomllib.loads(grid.read_text()))
    (cell,) = (c for key, c in collect_cells(cfg).items() if key == ("bn", 2))
    assert cell.moving == [final["final"]["test_acc_moving"]]
