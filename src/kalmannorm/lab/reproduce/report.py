"""``REPORT.md``: the measured evidence, the paper's numbers beside it, and plain statements.

:func:`write_report` formats a :class:`Findings` (gathered by
:mod:`kalmannorm.lab.reproduce.runner`) into Markdown; the statements ("BKN vs BN at s = 2:
+1.2 ± 0.4 pt (better)") are computed from the numbers by :mod:`kalmannorm.lab.reproduce.verdict`,
so a rerun rewrites them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalmannorm.lab import analysis
from kalmannorm.lab.analysis.report import markdown_table
from kalmannorm.lab.reproduce import paper_numbers
from kalmannorm.lab.reproduce.evidence import Cell, VarianceGapResult
from kalmannorm.lab.reproduce.verdict import Difference, difference, summarise_calls

#: The statistics analyses compare these labels (the paper's Fig. 8 and Table 3): BN, the
#: paper's BKN and the authors'-code variant.
BN, BKN, BKN_LR100, BKN_PROPAGATE = "bn", "bkn", "bkn-lr100", "bkn-propagate"
KALMAN = (BKN, BKN_LR100, BKN_PROPAGATE)
#: Relative difference below which two statistics errors (or gaps) are called the same.
SAME_WITHIN = 0.05


@dataclass
class Findings:
    """Everything the report shows; missing pieces (``None`` or empty) are reported as such."""

    budget: str
    header: dict[str, str]  # machine, date, wall time, command, scale
    sweep: dict[tuple[str, int | None], Cell] = field(default_factory=dict)
    sweep_batch_size: int = 128
    settings: dict[tuple[int, int], dict[str, Cell]] = field(default_factory=dict)
    widened: Cell | None = None
    widened_width: int | None = None
    table3_stat_batch: int = 2
    parameters: list[dict[str, Any]] = field(default_factory=list)
    variance_gap: list[VarianceGapResult] = field(default_factory=list)
    estimation_error: list[dict[str, Any]] = field(default_factory=list)
    gain: dict[str, analysis.LayerGain] = field(default_factory=dict)
    bench: dict[str, Any] | None = None
    bench_table: str | None = None
    figures: dict[str, str] = field(default_factory=dict)  # name -> file name beside REPORT.md
    failures: list[str] = field(default_factory=list)
    analysis_samples: int | None = None
    notes: list[str] = field(default_factory=list)  # how the budget's scale limits the claims


def _pct(cell: Cell | None, mode: str) -> str:
    if cell is None or not cell.seeds:
        return "\u2013"
    if cell.seeds == 1:
        return f"{100 * cell.mean(mode):.2f}"
    return f"{100 * cell.mean(mode):.2f} ± {100 * cell.std(mode):.2f}"


def _sweep_cell(findings: Findings, label: str, s: int) -> Cell | None:
    return findings.sweep.get((label, s)) or findings.sweep.get((label, None))


def sweep_tables(findings: Findings) -> str:
    """Final accuracy (%) per norm (rows) and statistics batch (columns), both eval modes."""
    sizes = sorted({s for (_, s) in findings.sweep if s is not None})
    labels = list(dict.fromkeys(label for label, _ in findings.sweep))
    parts = []
    for mode, title in (("moving", "moving statistics"), ("batch", "batch statistics")):
        rows = []
        for label in labels:
            row: dict[str, Any] = {"norm": label}
            for s in sizes:
                row[f"s={s}"] = _pct(_sweep_cell(findings, label, s), mode)
            rows.append(row)
        seeds = max((c.seeds for c in findings.sweep.values()), default=0)
        parts.append(
            f"Final test accuracy (%), {title} at test, mean ± std over {seeds} seeds "
            f"(a batch-independent norm has one value for every s):\n\n" + markdown_table(rows)
        )
    return "\n\n".join(parts)


def _calls(findings: Findings, a: str, b: str, mode: str) -> dict[int, Difference]:
    sizes = sorted({s for (_, s) in findings.sweep if s is not None})
    calls = {}
    for s in sizes:
        cell_a, cell_b = _sweep_cell(findings, a, s), _sweep_cell(findings, b, s)
        if cell_a is not None and cell_b is not None:
            calls[s] = difference(cell_a, cell_b, mode)
    return calls


def sweep_statements(findings: Findings) -> list[str]:
    """'bkn vs bn (moving statistics): better at 1, 2; tie at ...' for each Kalman variant
    against every other norm."""
    labels = list(dict.fromkeys(label for label, _ in findings.sweep))
    lines = []
    for kalman in [label for label in KALMAN if label in labels]:
        for other in [label for label in labels if label != kalman]:
            for mode in ("moving", "batch"):
                calls = _calls(findings, kalman, other, mode)
                if calls:
                    detail = ", ".join(f"s={s}: {d.text()}" for s, d in calls.items())
                    lines.append(
                        f"- **{kalman} vs {other}** ({mode} statistics): "
                        f"{summarise_calls(calls)}. "
                        f"<details><summary>differences</summary>{detail}</details>"
                    )
    return lines


def settings_table(findings: Findings) -> str:
    """The paper's (g, s) settings: per setting and norm, both eval modes, the paper's finding."""
    rows = []
    settings: dict[tuple[int, int], dict[str, Cell]] = {}
    for s in (2, 1):
        if any(size == s for _, size in findings.sweep):
            settings[(findings.sweep_batch_size, s)] = {
                label: cell
                for (label, size), cell in findings.sweep.items()
                if size == s or size is None
            }
    settings.update(findings.settings)
    for (g, s), cells in settings.items():
        paper = paper_numbers.SETTINGS.get((g, s)) or paper_numbers.SETTINGS.get(
            (256, s) if g == 128 else (g, s), ""
        )
        for index, (label, cell) in enumerate(cells.items()):
            rows.append(
                {
                    "(g, s)": f"({g}, {s})" if index == 0 else "",
                    "norm": label + (" (any s)" if cell.stat_batch_size is None else ""),
                    "seeds": cell.seeds,
                    "acc % moving (option B)": _pct(cell, "moving"),
                    "acc % batch (option A)": _pct(cell, "batch"),
                    "paper": paper if index == 0 else "",
                }
            )
    return markdown_table(rows)


def settings_statements(findings: Findings) -> list[str]:
    lines = []
    for (g, s), cells in findings.settings.items():
        for kalman in [label for label in KALMAN if label in cells and BN in cells]:
            for mode in ("moving", "batch"):
                d = difference(cells[kalman], cells[BN], mode)
                lines.append(f"- ({g}, {s}), {mode} statistics: {kalman} vs bn {d.text()}.")
    return lines


def table3_left(findings: Findings) -> str:
    """Accuracy with moving vs batch statistics at s = table3_stat_batch, beside the paper's."""
    s = findings.table3_stat_batch
    rows = []
    labels = list(dict.fromkeys(label for label, _ in findings.sweep))
    for label in labels:
        cell = _sweep_cell(findings, label, s)
        if cell is None:
            continue
        gap = 100 * (cell.mean("batch") - cell.mean("moving"))
        paper = paper_numbers.TABLE3_EVAL_MODES["CIFAR-10"].get(label.upper())
        rows.append(
            {
                "norm": label,
                "acc % batch": _pct(cell, "batch"),
                "acc % moving": _pct(cell, "moving"),
                "batch - moving (pt)": f"{gap:+.2f}",
                "paper CIFAR-10 batch / moving": f"{paper[0]} / {paper[1]}" if paper else "",
            }
        )
    baseline = findings.sweep.get((BN, findings.sweep_batch_size))
    if baseline is not None:
        rows.append(
            {
                "norm": f"baseline: bn, s={findings.sweep_batch_size}",
                "acc % batch": _pct(baseline, "batch"),
                "acc % moving": _pct(baseline, "moving"),
                "batch - moving (pt)": "",
                "paper CIFAR-10 batch / moving": f"- / {paper_numbers.TABLE3_BASELINE['CIFAR-10']}",
            }
        )
    return markdown_table(rows)


def table3_right(findings: Findings) -> str:
    """Parameter counts and accuracy of BN, BKN and the widened BN at s = table3_stat_batch."""
    s = findings.table3_stat_batch
    accuracy = {
        BN: _sweep_cell(findings, BN, s),
        BKN: _sweep_cell(findings, BKN, s),
        "widened": findings.widened,
    }
    rows = []
    for row in findings.parameters:
        key = row["model"]
        cell = accuracy.get(key)
        rows.append(
            {
                "model": key if key != "widened" else f"bn, width {findings.widened_width}",
                "parameters": row["parameters"],
                "of which Kalman (A, R, q)": row["kalman_parameters"],
                "vs BN": f"{row['ratio']:.3f}x",
                "acc % moving": _pct(cell, "moving"),
                "acc % batch": _pct(cell, "batch"),
            }
        )
    return markdown_table(rows)


def variance_gap_section(findings: Findings) -> str:
    if not findings.variance_gap:
        return "Not measured (no finished BN/BKN run at this statistics batch)."
    gaps = {f"{r.label} (s={r.stat_batch_size})": r.gaps for r in findings.variance_gap}
    return analysis.variance_gap_markdown(gaps)


def estimation_error_section(findings: Findings) -> str:
    if not findings.estimation_error:
        return "Not measured."
    rows = [
        {
            "norm": r["norm"],
            "s": r["stat_batch_size"],
            "mean err (normalised with)": r["mean_error"],
            "var err (normalised with)": r["var_error"],
            "mean err (group's batch stats)": r["batch_mean_error"],
            "var err (group's batch stats)": r["batch_var_error"],
        }
        for r in findings.estimation_error
    ]
    return markdown_table(rows, float_format=".3f")


def estimation_statements(findings: Findings) -> list[str]:
    """Per statistics batch: each Kalman variant's errors beside BN's."""
    by = {(r["norm"], r["stat_batch_size"]): r for r in findings.estimation_error}
    lines = []
    for (norm, s), row in by.items():
        if norm not in KALMAN or (BN, s) not in by:
            continue
        bn = by[(BN, s)]
        lines.append(
            f"- s={s}: variance error {norm} {row['var_error']:.3f} vs bn {bn['var_error']:.3f}; "
            f"mean error {norm} {row['mean_error']:.3f} vs bn {bn['mean_error']:.3f} "
            f"({norm}'s own groups' batch statistics: {row['batch_var_error']:.3f} / "
            f"{row['batch_mean_error']:.3f})"
        )
    return lines


#: Statistics batches the paper calls micro-batches ("less than 10 samples").
MICRO = 8


def _overall_call(calls: list[Difference]) -> str:
    kinds = {d.call for d in calls}
    if not calls or kinds == {"not measurable"}:
        return "not measurable"
    if kinds == {"better"}:
        return "reproduced"
    if "better" in kinds and "worse" not in kinds:
        return "partly reproduced"
    return "not reproduced"


def _lower(a: float, b: float) -> str:
    """'lower', 'the same' (within SAME_WITHIN) or 'higher': a against b."""
    if abs(a - b) <= SAME_WITHIN * max(abs(a), abs(b)):
        return "the same"
    return "lower" if a < b else "higher"


def verdict_lines(findings: Findings) -> list[str]:
    """One line per claim of the paper and Kalman variant: what we measured and whether it
    reproduced."""
    lines = []
    labels = {label for label, _ in findings.sweep}
    kalmans = [label for label in KALMAN if label in labels]
    s = findings.table3_stat_batch
    bn = _sweep_cell(findings, BN, s)
    baseline = findings.sweep.get((BN, findings.sweep_batch_size))
    for kalman in kalmans if BN in labels else []:
        for mode, option in (("moving", "moving statistics"), ("batch", "batch statistics")):
            calls = {
                size: d for size, d in _calls(findings, kalman, BN, mode).items() if size <= MICRO
            }
            lines.append(
                f"- *{kalman} beats BN with micro-batches (s ≤ {MICRO}), {option} at test*: "
                f"**{_overall_call(list(calls.values()))}** — {summarise_calls(calls)}."
            )
    for kalman in kalmans:
        cell = _sweep_cell(findings, kalman, s)
        if cell is not None and baseline is not None:
            d = difference(cell, baseline)
            lines.append(
                f"- *{kalman} with s = {s} comes close to BN with s = "
                f"{findings.sweep_batch_size}* (paper, CIFAR-10: 90.9 vs 92.1 %): "
                f"{_pct(cell, 'moving')} % vs {_pct(baseline, 'moving')} % ({d.text()})."
            )
    for kalman in kalmans:
        cell = _sweep_cell(findings, kalman, s)
        if bn is None or cell is None:
            continue
        gap_bn = 100 * abs(bn.mean("batch") - bn.mean("moving"))
        gap_k = 100 * abs(cell.mean("batch") - cell.mean("moving"))
        if gap_k <= 1.0 < gap_bn:
            call = "reproduced"
        elif gap_k < gap_bn:
            call = "partly reproduced (the gap narrows but stays)"
        else:
            call = "not reproduced"
        lines.append(
            f"- *With {kalman}, batch and moving statistics give the same accuracy; BN has a gap* "
            f"(Table 3, s = {s}): **{call}** — |batch - moving| {kalman} {gap_k:.2f} pt, "
            f"bn {gap_bn:.2f} pt."
        )
    by_label = {r.label: r for r in findings.variance_gap}
    for kalman in [label for label in KALMAN if label in by_label and BN in by_label]:
        mean_bn, mean_k = _mean_gap(by_label[BN]), _mean_gap(by_label[kalman])
        relation = _lower(mean_k, mean_bn)
        call = "reproduced" if relation == "lower" else "not reproduced"
        lines.append(
            f"- *{kalman}'s variance gap is smaller than BN's* (Fig. 8, s = {s}): **{call}** — "
            f"mean relative gap {kalman} {mean_k:.3f}, bn {mean_bn:.3f} ({relation}; 'the same' "
            f"means within {SAME_WITHIN:.0%})."
        )
    errors = {(r["norm"], r["stat_batch_size"]): r for r in findings.estimation_error}
    for kalman in KALMAN:
        pairs = [
            (size, errors[(kalman, size)]["var_error"], errors[(BN, size)]["var_error"])
            for (norm, size) in errors
            if norm == kalman and (BN, size) in errors and size <= MICRO
        ]
        if not pairs:
            continue
        relations = {size: _lower(a, b) for size, a, b in pairs}
        wins = [size for size, relation in relations.items() if relation == "lower"]
        call = (
            "reproduced"
            if len(wins) == len(pairs)
            else ("partly reproduced" if wins else "not reproduced")
        )
        detail = ", ".join(f"s={size}: {relation}" for size, relation in relations.items())
        lines.append(
            f"- *{kalman} estimates the statistics more accurately than BN* (variance error "
            f"against the population, s ≤ {MICRO}; not measured in the paper): **{call}** — "
            f"{detail}."
        )
    if findings.widened is not None and bn is not None:
        d = difference(findings.widened, bn)
        call = {"tie": "reproduced", "worse": "reproduced", "better": "not reproduced"}.get(
            d.call, d.call
        )
        bkn = _sweep_cell(findings, BKN, s)
        versus_bkn = difference(bkn, findings.widened).text() if bkn is not None else "-"
        lines.append(
            f"- *A BN network widened to BKN's parameter count gains nothing* (Table 3): "
            f"**{call}** — widened BN vs BN {d.text()}; bkn vs widened BN {versus_bkn}."
        )
    for (g, size), cells in findings.settings.items():
        for kalman in [label for label in KALMAN if label in cells and BN in cells]:
            calls = [difference(cells[kalman], cells[BN], mode) for mode in ("moving", "batch")]
            lines.append(
                f"- *{kalman} beats BN at ({g}, {size})*: **{_overall_call(calls)}** — moving "
                f"{calls[0].text()}, batch {calls[1].text()}."
            )
    if findings.bench:
        ratio = findings.bench.get("step_ratio_eager")
        compiled = findings.bench.get("step_ratio_compiled")
        if ratio is not None:
            lines.append(
                f"- *BKN costs about 1.015x BN per training step* (Table 2): ResNet-20 step "
                f"on this CPU, eager: {ratio:.2f}x"
                + (f", compiled: {compiled:.2f}x" if compiled is not None else "")
                + " (see section 7)."
            )
    return lines


def _mean_gap(result: VarianceGapResult) -> float:
    values = [gap.summary for gap in result.gaps.values()]
    return sum(values) / len(values)


def _figure(findings: Findings, name: str, caption: str) -> str:
    file = findings.figures.get(name)
    return f"![{caption}]({file})" if file else f"*({caption}: not drawn — {name} missing)*"


def write_report(findings: Findings, path: str | Path) -> Path:
    """Write ``REPORT.md`` (figures are expected beside it, named in ``findings.figures``)."""
    path = Path(path)
    h = findings.header
    s = findings.table3_stat_batch
    lines = [
        f"# Batch Kalman Normalization, re-measured ({findings.budget} budget)",
        "",
        "Produced by `" + h.get("command", "kalmannorm reproduce") + "`; every number below comes "
        "from the run folders of that command and is rewritten when it runs again.",
        "",
        *[f"- **{key}**: {value}" for key, value in h.items() if key != "command"],
        "",
    ]
    if findings.notes:
        lines += [f"- {note}" for note in findings.notes] + [""]
    if findings.failures:
        lines += ["**Runs that failed** (left out of every table):", ""]
        lines += [f"- {failure}" for failure in findings.failures] + [""]
    lines += [
        "## Verdict: the paper's claims at this scale",
        "",
        "Computed from the tables below (a difference counts only beyond twice its standard "
        "error over seeds).",
        "",
        *verdict_lines(findings),
        "",
        "## 1. Micro-batch sweep (the paper's Figs. 3-7 in one plot)",
        "",
        f"Gradient batch {findings.sweep_batch_size}, statistics batch s from the columns; "
        "BN with s = "
        f"{findings.sweep_batch_size} is plain BatchNorm (the baseline). `bn` is ghost "
        "BatchNorm, `bkn` the paper's BKN (learned A, R, q), `bkn-lr100` the same with A, R, q "
        "at 100 times the learning rate (not in the paper; docs/design/kalman-learning-rate.md), "
        "`bkn-propagate` the authors'-code variant (prior pushed through the layer below, fixed "
        "q), `gkn` Group Kalman Normalization.",
        "",
        _figure(findings, "sweep", "final accuracy against statistics batch"),
        "",
        sweep_tables(findings) if findings.sweep else "No sweep runs finished.",
        "",
        "What the sweep says (differences are BKN minus the other norm; a difference is called "
        "only beyond twice its standard error over seeds — with 3 seeds a rough guide):",
        "",
        *sweep_statements(findings),
        "",
        "## 2. The paper's (gradient batch, statistics batch) settings",
        "",
        "Option A evaluates with batch statistics, option B with moving (population) statistics "
        "(the paper's Fig. 4). Smaller gradient batches train on as many samples as the sweep "
        "(more steps), learning rate and warm-up scaled linearly with the batch.",
        "",
        settings_table(findings),
        "",
        *settings_statements(findings),
        "",
        f"## 3. Table 3 — evaluation with batch vs moving statistics, and parameters (s = {s})",
        "",
        table3_left(findings),
        "",
        "Parameters (the paper: BN 49M, BKN 52M on CIFAR; a widened BN gained nothing). Here the "
        "BN network is widened to at least BKN's parameter count and trained with the same recipe:",
        "",
        table3_right(findings) if findings.parameters else "Not measured.",
        "",
        f"## 4. Fig. 8 — variance gap (s = {s})",
        "",
        "After training, the training images (without augmentation"
        + (f", the first {findings.analysis_samples}" if findings.analysis_samples else "")
        + ") are forwarded in statistics groups; per layer, the mean over channels and groups of "
        "|v_g - v_moving| / v_moving, where v_g is the variance the group is normalised with "
        "(BN: its batch variance; BKN: the posterior). Smaller means the training-time "
        "statistics agree better with those used at test time.",
        "",
        variance_gap_section(findings),
        "",
        *(
            line
            for r in findings.variance_gap
            for line in (
                _figure(findings, f"variance_gap_{r.label}", f"variance gap, {r.label}"),
                "",
            )
        ),
        "## 5. Estimation error against the population (not in the paper)",
        "",
        "For each norm and statistics batch, the model trained at that s: the statistics each "
        "group is normalised with, against the population statistics of the same layer over "
        "the same images and weights (mean error in population standard deviations, variance "
        "error relative), averaged over layers. The last two columns are the groups' own batch "
        "statistics, which a Kalman layer refines.",
        "",
        estimation_error_section(findings),
        "",
        *estimation_statements(findings),
        "",
        "## 6. What BKN learned: the gain q per layer",
        "",
        "q = 1 trusts the layer's own batch statistics only (BatchNorm); q = 0 only the prior "
        "from the layer below.",
        "",
        analysis.gain_markdown(findings.gain) if findings.gain else "Not measured.",
        "",
        _figure(findings, "gain", "gain q per layer"),
        "",
        "## 7. Throughput (`kalmannorm bench`)",
        "",
        "BKN time / BatchNorm time on this machine (the paper, Table 2: BKN 320.94 vs BN "
        "325.74 examples/s, 1.015x, on 4 Titan-X):",
        "",
        findings.bench_table or "Not measured (run with --bench).",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def cells_by_label(cells: Mapping[tuple[str, int | None], Cell]) -> dict[str, Cell]:
    """The cells of a single-statistics-batch grid by label."""
    return {label: cell for (label, _), cell in cells.items()}
