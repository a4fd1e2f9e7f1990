"""``kalmannorm compare``: a grid run in parallel processes, its table, skipping finished runs."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import pytest

from kalmannorm.lab.cli import main
from kalmannorm.lab.train import ConfigError
from kalmannorm.lab.train.compare import compare_config_from_dict, make_grid

GRID = """
[compare]
out = "{out}"
norms = ["bkn"]
stat_batch_sizes = [2]
seeds = [0, 1]
baseline = "none"
jobs = 2

[train]
dataset = "digits"
model = "small_cnn"
batch_size = 16
steps = 24
eval_every = 8
lr = 0.05

[train.model_options]
width = 8
"""


def test_compare_runs_the_grid_writes_the_table_and_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "grid"
    (tmp_path / "grid.toml").write_text(GRID.format(out=out))
    assert main(["compare", "--config", str(tmp_path / "grid.toml")]) == 0
    printed = capsys.readouterr().out
    assert "4 runs: 0 already finished, 4 to run, 2 at a time" in printed
    # a progress line per evaluation of every run while it trains
    progress = [line for line in printed.splitlines() if ": step " in line]
    assert len(progress) == 4 * 3 and all(line.startswith("[") for line in progress)
    table = (out / "summary.md").read_text()
    assert table in printed
    lines = table.strip().splitlines()
    assert lines[0].startswith("| norm | stat batch | seeds | final acc % (moving)")
    assert lines[2].startswith("| none (baseline) | 16 | 2 |") and "±" in lines[2]
    assert lines[3].startswith("| bkn | 2 | 2 |")
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == ["none (baseline)", "bkn"]
    # and one sentence saying what the table means, with the table's own numbers
    mean = 100 * float(rows[1]["final_moving_mean"])
    sentence = next(line for line in printed.splitlines() if line.startswith("Meaning:"))
    assert "bkn trains best" in sentence and f"{mean:.2f}" in sentence
    assert 0.1 < float(rows[1]["final_moving_mean"]) <= 1.0
    assert float(rows[0]["steps_to_baseline_mean"]) <= 24  # the baseline reaches itself
    if pytest.importorskip("matplotlib"):
        assert (out / "curves.png").stat().st_size > 1000
    for run in ("none-sall-seed0", "bkn-s2-seed1"):
        assert (out / run / "summary.json").exists() and (out / run / "train.log").exists()

    assert main(["compare", "--config", str(tmp_path / "grid.toml")]) == 0
    assert "4 runs: 4 already finished, 0 to run" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("best", "where"),
    [
        (0.8357, "level with"),
        (0.835704, "level with"),  # a difference the table's rounding does not show
        (0.83, "0.57 points below"),
        (0.84, "0.43 points above"),
    ],
)
def test_the_sentence_places_the_best_norm_against_the_baseline(best, where) -> None:
    from kalmannorm.lab.train.compare import Row, conclusion

    def row(label: str, final: float) -> Row:
        return Row(label, "bn", "2", 1, [final], [final], [final], [final], [None], [1.0], [])

    rows = [row("bn-plain (baseline)", 0.8357), row("bkn", best), row("gn", 0.7981)]
    sentence = conclusion(rows)
    assert f"bkn trains best ({100 * best:.2f} % with moving statistics, 1 seed), {where} " in (
        sentence
    )
    assert sentence.endswith("bn-plain with the whole batch (83.57 %); then gn 79.81 %.")


def test_the_sentence_with_one_norm_besides_the_baseline_names_no_others() -> None:
    from kalmannorm.lab.train.compare import Row, conclusion

    rows = [
        Row(
            "bn (baseline)",
            "bn",
            "128",
            3,
            [0.9125],
            [0.9097],
            [0.9125],
            [0.9097],
            [None],
            [1.0],
            [],
        ),
        Row("gn", "gn", "any", 3, [0.9116], [0.9116], [0.9116], [0.9116], [None], [1.0], []),
    ]
    assert conclusion(rows).endswith("0.09 points below bn with the whole batch (91.25 %).")


def test_grid_variants_and_bad_norms(tmp_path: Path) -> None:
    cfg = compare_config_from_dict(
        {
            "compare": {
                "out": str(tmp_path),
                "norms": [
                    "bn",
                    {"norm": "bkn", "label": "bkn-propagate", "options": {"prior": "propagate"}},
                ],
                "stat_batch_sizes": [2, 4],
                "seeds": [0],
                "baseline": "none",
            },
            "train": {"dataset": "digits", "batch_size": 16},
        }
    )
    specs = make_grid(cfg)
    assert [s.folder.name for s in specs] == [
        "none-sall-seed0",
        "bn-s2-seed0",
        "bn-s4-seed0",
        "bkn-propagate-s2-seed0",
        "bkn-propagate-s4-seed0",
    ]
    assert specs[3].config.norm_options == {"prior": "propagate"}
    assert specs[0].config.stat_batch_size is None and specs[4].config.stat_batch_size == 4
    cfg.norms[0] = compare_config_from_dict({"compare": {"norms": ["nope"]}}).norms[0]
    with pytest.raises(ConfigError, match="unknown norm 'nope'.*bkn"):
        make_grid(cfg)
    cfg.stat_batch_sizes = [3]
    cfg.norms = cfg.norms[1:]
    with pytest.raises(ConfigError, match="statistics groups of 3"):
        make_grid(cfg)


def test_a_norm_entry_overrides_training_keys_for_its_runs_only(tmp_path: Path) -> None:
    entry = {"norm": "bkn", "label": "bkn-lr100", "train": {"kalman_lr_scale": 100.0}}
    values = {
        "compare": {"out": str(tmp_path), "norms": ["bkn", entry], "baseline": ""},
        "train": {"dataset": "digits", "batch_size": 16, "lr": 0.05},
    }
    cfg = compare_config_from_dict(values)
    plain, scaled = make_grid(cfg)
    assert (plain.config.kalman_lr_scale, scaled.config.kalman_lr_scale) == (1.0, 100.0)
    assert plain.config.lr == scaled.config.lr == 0.05
    # the resolved grid file written beside the runs reads back to the same grid
    again = compare_config_from_dict(tomllib.loads(cfg.to_toml()))
    assert [s.config for s in make_grid(again)] == [plain.config, scaled.config]
    for key in ("seed", "stat_batch_size", "norm_options"):
        bad = {**values, "compare": {**values["compare"], "norms": [{**entry, "train": {key: 1}}]}}
        with pytest.raises(ConfigError, match="the grid sets"):
            compare_config_from_dict(bad)
    bad = {**values, "compare": {**values["compare"], "norms": [{**entry, "train": {"lrr": 1}}]}}
    with pytest.raises(ValueError, match="unknown configuration key"):
        make_grid(compare_config_from_dict(bad))


def test_default_preset_falls_back_to_digits(monkeypatch, capsys) -> None:
    from kalmannorm.lab.train import presets

    monkeypatch.setattr(presets, "dataset_available", lambda name: False)
    cfg = presets.default()
    assert cfg.train["dataset"] == "digits" and "using digits" in capsys.readouterr().out
    assert [v.norm for v in cfg.norms] == ["bn", "bkn-flow", "mabn", "gn"]
    assert cfg.baseline.norm == "none" and cfg.stat_batch_sizes == [2]
    grid = {spec.variant.label: spec.config for spec in make_grid(cfg)}
    assert len(grid) == 5
    # the recommended BKN and MABN train on centred convolutions, the others on plain ones
    centred = {label for label, config in grid.items() if config.center_weights}
    assert centred == {"bkn-flow-centred", "mabn"}
    assert grid["mabn"].norm_options["renorm_start"] == grid["mabn"].steps // 4


def test_report_presets_build_their_grids():
    from kalmannorm.lab.train.compare import make_grid
    from kalmannorm.lab.train.presets import PRESETS

    sweep = make_grid(PRESETS["microbatch-sweep"]())
    # 6 batch-statistics norms x 7 sizes x 3 seeds, gn and gkn once per seed; bn at s=128 is
    # the plain-BN baseline
    assert len(sweep) == 6 * 7 * 3 + 2 * 3
    assert [spec.seed for spec in sweep] == sorted(spec.seed for spec in sweep)  # seed-major
    brn = next(s for s in sweep if s.variant.label == "brn").config.norm_options
    steps = sweep[0].config.steps
    assert brn["warmup_steps"] == round(0.04 * steps) and brn["r_max_relax_steps"] < steps
    assert {spec.stat_batch_size for spec in sweep if spec.variant.label == "gkn"} == {None}
    propagate = [s for s in sweep if s.variant.label == "bkn-propagate"]
    assert propagate and propagate[0].config.norm_options == {"prior": "propagate"}
    scales = {s.variant.label: s.config.kalman_lr_scale for s in sweep}
    assert scales["bkn-lr100"] == 100.0 and scales["bkn"] == scales["bkn-propagate"] == 1.0
    paper = make_grid(PRESETS["paper-cifar10"]())
    assert {spec.config.model for spec in paper} == {"inception_cifar"}
    assert all(spec.config.epochs == 400 for spec in paper)
