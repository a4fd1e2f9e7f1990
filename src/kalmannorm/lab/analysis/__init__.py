"""Analysis of trained normalization networks: the paper's evidence, measured.

Pure functions over a model and a data set, plus PNG writers (matplotlib, optional):

- :func:`collect_statistics`: per-layer, per-statistics-group statistics over a data set, and the
  population statistics of each layer's input (``statistics.py``);
- :func:`measure_variance_gap`: the paper's Fig. 8, normalising vs moving variance
  (``variance_gap.py``);
- :func:`measure_estimation_error`: error of the per-group statistics against the population
  (``estimation_error.py``);
- :func:`eval_mode_accuracy`: accuracy with moving vs batch statistics, Table 3 left
  (``eval_modes.py``);
- :func:`parameter_count`, :func:`width_for_parameter_count`: Table 3 right and the widened-BN
  control (``params.py``);
- :func:`gain_snapshot`: learned gain q, ||A||_F and R per layer (``gain.py``);
- ``report.py``: Markdown tables of all of these.

None of them changes the model: buffers, modes and settings are restored.
"""

from kalmannorm.lab.analysis.batches import DataSource, iterate_batches
from kalmannorm.lab.analysis.estimation_error import (
    EstimationErrorTable,
    estimation_error_table,
    layer_estimation_error,
    measure_estimation_error,
)
from kalmannorm.lab.analysis.eval_modes import (
    EvalModeAccuracy,
    accuracy,
    eval_mode_accuracy,
    moving_statistics_mode,
)
from kalmannorm.lab.analysis.gain import (
    LayerGain,
    gain_history_rows,
    gain_rows,
    gain_snapshot,
    gain_snapshots_from_checkpoints,
    write_gain_distribution_plot,
    write_gain_history_plot,
)
from kalmannorm.lab.analysis.params import (
    ParameterCount,
    WidthMatch,
    compare_parameters,
    count_parameters,
    parameter_count,
    width_for_parameter_count,
)
from kalmannorm.lab.analysis.report import (
    estimation_error_markdown,
    eval_modes_markdown,
    gain_markdown,
    markdown_table,
    parameters_markdown,
    variance_gap_markdown,
)
from kalmannorm.lab.analysis.statistics import (
    LayerStatistics,
    PopulationMoments,
    collect_statistics,
)
from kalmannorm.lab.analysis.variance_gap import (
    VarianceGap,
    measure_variance_gap,
    variance_gap,
    variance_gap_summary,
    variance_gaps,
    write_variance_gap_heatmap,
)
from kalmannorm.lab.train.batch_mode import (
    GroupStatistics,
    NormLayer,
    batch_statistics_mode,
    find_norm_layers,
)

__all__ = [
    "DataSource",
    "EstimationErrorTable",
    "EvalModeAccuracy",
    "GroupStatistics",
    "LayerGain",
    "LayerStatistics",
    "NormLayer",
    "ParameterCount",
    "PopulationMoments",
    "VarianceGap",
    "WidthMatch",
    "accuracy",
    "batch_statistics_mode",
    "collect_statistics",
    "compare_parameters",
    "count_parameters",
    "estimation_error_markdown",
    "estimation_error_table",
    "eval_mode_accuracy",
    "eval_modes_markdown",
    "find_norm_layers",
    "gain_history_rows",
    "gain_markdown",
    "gain_rows",
    "gain_snapshot",
    "gain_snapshots_from_checkpoints",
    "iterate_batches",
    "layer_estimation_error",
    "markdown_table",
    "measure_estimation_error",
    "measure_variance_gap",
    "moving_statistics_mode",
    "parameter_count",
    "parameters_markdown",
    "variance_gap",
    "variance_gap_markdown",
    "variance_gap_summary",
    "variance_gaps",
    "width_for_parameter_count",
    "write_gain_distribution_plot",
    "write_gain_history_plot",
    "write_variance_gap_heatmap",
]
