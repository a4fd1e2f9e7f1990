"""Markdown tables of the analysis results, for the report generator.

:func:`markdown_table` formats any list of row dicts; the other functions shape one kind of
result into rows first. Floats get ``float_format`` (default 4 decimals), ``None`` prints as an
en dash, and ``|`` inside a cell is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kalmannorm.lab.analysis.estimation_error import ERROR_KEYS, EstimationErrorTable
from kalmannorm.lab.analysis.eval_modes import EvalModeAccuracy
from kalmannorm.lab.analysis.gain import LayerGain, gain_rows
from kalmannorm.lab.analysis.variance_gap import VarianceGap


def format_cell(value: Any, float_format: str = ".4f") -> str:
    """One cell: floats with ``float_format``, ``None`` as an en dash, ``|`` escaped."""
    if value is None:
        return "\u2013"  # en dash
    if isinstance(value, float):
        text = str(value) if math.isnan(value) or math.isinf(value) else format(value, float_format)
    else:
        text = str(value)
    return text.replace("|", "\\|")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    float_format: str = ".4f",
) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (text and ``None`` left-aligned, numbers
    right-aligned). ``columns`` selects and orders the keys (default: the first row's, then
    any new ones); ``headers`` renames them."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    headers = headers or {}

    def numeric(column: str) -> bool:
        values = [row.get(column) for row in rows if row.get(column) is not None]
        return bool(values) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        )

    head = "| " + " | ".join(format_cell(headers.get(c, c)) for c in columns) + " |"
    rule = "|" + "|".join("---:" if numeric(c) else ":---" for c in columns) + "|"
    body = [
        "| " + " | ".join(format_cell(row.get(c), float_format) for c in columns) + " |"
        for row in rows
    ]
    return "\n".join([head, rule, *body])


def variance_gap_markdown(gaps: Mapping[str, Mapping[str, VarianceGap]]) -> str:
    """Mean absolute relative variance gap per layer (rows) and model (columns), plus the mean
    over layers; ``gaps`` maps a model label (e.g. "BN", "BKN") to its layers' gaps."""
    layers = list(dict.fromkeys(name for per_model in gaps.values() for name in per_model))
    rows: list[dict[str, Any]] = []
    for layer in layers:
        row: dict[str, Any] = {"layer": layer}
        for label, per_model in gaps.items():
            row[label] = per_model[layer].summary if layer in per_model else None
        rows.append(row)
    mean_row: dict[str, Any] = {"layer": "**mean**"}
    for label, per_model in gaps.items():
        values = [gap.summary for gap in per_model.values()]
        mean_row[label] = sum(values) / len(values) if values else None
    rows.append(mean_row)
    return markdown_table(rows, ["layer", *gaps])


_ERROR_HEADERS = {
    "stat_batch_size": "stat batch",
    "values_per_group": "values/group",
    "mean_error": "mean err (used)",
    "var_error": "var err (used)",
    "batch_mean_error": "mean err (batch)",
    "batch_var_error": "var err (batch)",
}


def estimation_error_markdown(
    tables: EstimationErrorTable | Mapping[str, EstimationErrorTable], *, per_layer: bool = False
) -> str:
    """The estimation errors: the overall rows (means over layers), or with ``per_layer`` every
    layer's row; ``tables`` may map a norm label to its table (a ``norm`` column is added)."""
    labelled = tables if isinstance(tables, Mapping) else {"": tables}
    rows = []
    for label, table in labelled.items():
        for row in table.rows if per_layer else table.overall:
            rows.append({"norm": label, **row} if label else dict(row))
    keys = (
        ["layer", "kind", "stat_batch_size", "groups", "values_per_group", *ERROR_KEYS]
        if per_layer
        else ["stat_batch_size", "layers", *ERROR_KEYS]
    )
    columns = (["norm"] if not isinstance(tables, EstimationErrorTable) else []) + keys
    return markdown_table(rows, columns, headers=_ERROR_HEADERS)


def eval_modes_markdown(results: Mapping[str, EvalModeAccuracy]) -> str:
    """Table 3 (left): accuracy with moving and batch statistics per model label."""
    rows = [{"model": label, **result.as_row()} for label, result in results.items()]
    return markdown_table(
        rows,
        ["model", "stat_batch_size", "acc_moving", "acc_batch", "samples_moving", "samples_batch"],
        headers={
            "stat_batch_size": "stat batch",
            "acc_moving": "acc (moving)",
            "acc_batch": "acc (batch)",
            "samples_moving": "n (moving)",
            "samples_batch": "n (batch)",
        },
    )


def parameters_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Table 3 (right): rows of :func:`kalmannorm.lab.analysis.compare_parameters`."""
    return markdown_table(
        rows,
        ["model", "parameters", "norm_parameters", "kalman_parameters", "extra", "ratio"],
        headers={"norm_parameters": "in norms", "kalman_parameters": "Kalman (A, R, q)"},
        float_format=".3f",
    )


def gain_markdown(snapshot: Mapping[str, LayerGain]) -> str:
    """Per layer: the gain q's mean, std, min and max, ||A||_F and mean R."""
    return markdown_table(
        gain_rows(snapshot),
        headers={"transition_norm": "‖A‖_F", "noise_mean": "mean R"},
        float_format=".3f",
    )
