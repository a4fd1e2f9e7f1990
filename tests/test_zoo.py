"""The zoo matrix on the test suite's families (kalmannorm.lab.zoo, ``--quick``): a torchvision
model, timm's BatchNormAct2d and FrozenBatchNormAct2d layers and timm's norm+act factory, each
with every registered norm: train step, eval, state-dict round trip, BatchNorm checkpoint (eval
equal to the BN model's for bkn, bn, brn, cbn), fold and parameter count. The whole matrix:
``kalmannorm zoo``."""

import functools

import pytest

import kalmannorm

pytest.importorskip("torchvision")
pytest.importorskip("timm")

from kalmannorm.lab import zoo

QUICK = {family.name: family for family in zoo.families() if family.quick}


@functools.cache
def _prepared(name: str) -> zoo.Prepared:
    return zoo.prepare(QUICK[name])


@pytest.mark.parametrize("norm", sorted(kalmannorm.available_norms()))
@pytest.mark.parametrize("family", sorted(QUICK))
def test_zoo_cell(family: str, norm: str) -> None:
    result = zoo.run_cell(QUICK[family], norm, _prepared(family))
    failed = {check: value for check, value in result.items() if value not in ("ok", "-")}
    assert not failed, failed


def test_the_quick_families_cover_the_integrations() -> None:
    names = " ".join(QUICK)
    assert "tv:" in names and "FrozenBNAct" in names and "norm_layer=" in names
    assert any(f.factory is not None for f in QUICK.values())


def test_matrix_markdown_counts_cells_and_lists_failures() -> None:
    family = next(iter(QUICK.values()))
    rows = [
        (family, "bkn", dict.fromkeys(zoo.CHECKS, "ok"), 0.1),
        (family, "gn", {**dict.fromkeys(zoo.CHECKS, "ok"), "fold": "folded eval differs"}, 0.1),
    ]
    table = zoo.matrix_markdown(rows)
    assert "| bkn | gn |" in table and "| ok | 5/6 |" in table
    assert "1 of 2 cells pass" in table and "gn: fold: folded eval differs" in table


def test_parameter_costs_of_a_model() -> None:
    costs = zoo.parameter_costs(("mobilenet_v2",), ("bkn", "bn", "frn"))
    assert costs["bn"]["mobilenet_v2"] == 1.0
    assert 1.0 < costs["frn"]["mobilenet_v2"] < costs["bkn"]["mobilenet_v2"] < 1.2
    assert "| bkn | x1." in zoo.costs_markdown(costs)


def test_the_zoo_and_norms_commands(capsys) -> None:
    from kalmannorm.lab.cli import main

    assert main(["zoo", "--list", "--quick"]) == 0
    assert "timm:test_efficientnet FrozenBNAct" in capsys.readouterr().out
    assert main(["norms"]) == 0
    out = capsys.readouterr().out
    assert "parameters over BatchNorm's 2C: 3C (a, R, q)" in out


@pytest.mark.parametrize("family", ["tv:video resnet(1,1,1,1)", "tv:resnet(1,1,1,1) SyncBN"])
def test_zoo_cell_of_3d_and_sync_batchnorm_models(family: str) -> None:
    """A video model (BatchNorm3d) and SyncBatchNorm, with BKN (the full matrix: all norms)."""
    chosen = next(f for f in zoo.families() if f.name == family)
    result = zoo.run_cell(chosen, "bkn")
    failed = {check: value for check, value in result.items() if value not in ("ok", "-")}
    assert not failed, failed
