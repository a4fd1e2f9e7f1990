"""The Examples sections of the public layers run as written (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "kalmannorm.layers.batch_kalman",
    "kalmannorm.layers.group_kalman",
    "kalmannorm.layers.ghost_batch",
    "kalmannorm.layers.batch_renorm",
    "kalmannorm.layers.cross_iteration",
    "kalmannorm.layers.moving_average_batch",
    "kalmannorm.layers.filter_response",
    "kalmannorm.layers.evonorm",
    "kalmannorm.layers.layer_norm",
]


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_of_the_public_layers_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0, f"{name} has no Examples section"
    assert result.failed == 0
