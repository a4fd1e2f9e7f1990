"""``REPORT.md`` of the residual budget: the accuracy table, the verdicts and a recommendation.

Everything is computed from the run folders (:func:`kalmannorm.lab.reproduce.evidence.
collect_cells`). A difference is called only beyond twice its standard error over seeds
(:mod:`kalmannorm.lab.reproduce.verdict`); the fraction of the gap closed is
(acc - acc_ghost BN) / (acc_BN@128 - acc_ghost BN) at the same statistics batch, with moving
statistics (the evaluation a user gets by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kalmannorm.lab.reproduce.evidence import Cell
from kalmannorm.lab.reproduce.residual import CANDIDATES, DISPLAY, FLOW
from kalmannorm.lab.reproduce.verdict import difference

Cells = Mapping[tuple[str, int | None], Cell]
MODES = ("moving", "batch", "precise")
MODE_TEXT = {
    "moving": "moving statistics",
    "batch": "the test group's batch statistics",
    "precise": "PreciseBN statistics",
}


@dataclass
class ResidualFindings:
    """What the residual report shows: the cells, the header lines and the notes."""

    cells: dict[tuple[str, int | None], Cell]
    header: dict[str, str]
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    figure: str | None = None  # file name beside REPORT.md
    step_time: dict[str, float] = field(default_factory=dict)  # label -> step time / BN's
    secondary: str | None = None  # link to the quick check's report
    search: list[str] = field(default_factory=list)  # the held-out search's lines
    searched: dict[tuple[str, int | None], Cell] = field(default_factory=dict)  # its picks


def name(label: str) -> str:
    return DISPLAY.get(label, label)


def sizes(cells: Cells) -> list[int]:
    return sorted({s for (_, s) in cells if s is not None})


def cell_at(cells: Cells, label: str, s: int) -> Cell | None:
    """The cell of ``label`` at ``s``: a batch-independent norm's single cell at every s."""
    return cells.get((label, s)) or cells.get((label, None))


def accuracy(cell: Cell, mode: str) -> str:
    values = getattr(cell, mode)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * cell.mean(mode):.2f}"
    return f"{100 * cell.mean(mode):.2f} ± {100 * cell.std(mode):.2f}"


def gap_closed(cells: Cells, cell: Cell, s: int) -> float | None:
    """(acc - ghost BN) / (BN@128 - ghost BN) at ``s``, moving statistics."""
    top, bottom = cells.get(("none", None)), cells.get(("bn", s))
    if top is None or bottom is None or cell.label in ("bn", "none"):
        return None
    span = top.mean() - bottom.mean()
    # a ratio of a gap within noise (or of none: ghost BN at least as good) says nothing
    noise = 2 * (top.sem() ** 2 + bottom.sem() ** 2) ** 0.5
    return None if span <= noise else (cell.mean() - bottom.mean()) / span


def strongest(cells: Cells, norm: str) -> Cell | None:
    """The batch-independent cell of ``norm`` (any setting: GN's groups, BN@128 plain or with
    centred convolutions; ``"none"`` is BN over the whole batch) with the highest mean accuracy:
    the one every *vs GN* / *vs BN@128* verdict is against (chosen on test results, which can
    only favour the baseline)."""
    found = [c for (_, s), c in cells.items() if s is None and c.norm == norm and c.seeds]
    return max(found, key=lambda c: c.mean(), default=None)


def best_mode(cell: Cell) -> str:
    """The evaluation with the highest mean accuracy (chosen on the test results: a guide)."""
    return max((m for m in MODES if getattr(cell, m)), key=cell.mean)


def table(cells: Cells) -> list[str]:
    lines = [
        "| s | norm | seeds | moving | batch | precise | gap closed | vs ghost BN | vs GN "
        "| vs BN@128 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gn, top = strongest(cells, "gn"), strongest(cells, "none")

    def against(cell: Cell, other: Cell | None) -> str:
        return difference(cell, other).text() if other and cell is not other else ""

    # the cells that do not depend on the statistics batch, one row each: BatchNorm over the
    # whole batch first (plain, then the others), then GN, then the other batch-free norms
    free = sorted(
        (c for (_, size), c in cells.items() if size is None),
        key=lambda c: (c.norm != "none", c.label not in ("none", "gn"), c.label),
    )
    for cell in free:
        whole = cell.norm == "none"
        precise = accuracy(cell, "precise") if whole else "-"
        closed = "100 %" if cell.label == "none" else ""
        lines.append(
            f"| {'128' if whole else 'any'} | {name(cell.label)} | {cell.seeds} | "
            f"{accuracy(cell, 'moving')} | {accuracy(cell, 'batch')} | {precise} | {closed} | | "
            f"{against(cell, gn)} | {against(cell, top)} |"
        )
    for s in sizes(cells):
        ghost = cells.get(("bn", s))
        rows = sorted((c for (_, size), c in cells.items() if size == s), key=_row_order)
        for cell in rows:
            closed = gap_closed(cells, cell, s)
            lines.append(
                f"| {s} | {name(cell.label)} | {cell.seeds} | {accuracy(cell, 'moving')} | "
                f"{accuracy(cell, 'batch')} | {accuracy(cell, 'precise')} | "
                f"{'' if closed is None else f'{closed:.0%}'} | {against(cell, ghost)} | "
                f"{against(cell, gn)} | {against(cell, top)} |"
            )
    return lines


def _row_order(cell: Cell) -> tuple[int, str]:
    rank = {"bn": 0, FLOW.label: 1}
    return (rank.get(cell.label, 2), cell.label)


#: The BKN rows the verdict lines are about: the registry's ``bkn-flow`` and the same with
#: centred convolutions.
VERDICT_LABELS = (FLOW.label, "bkn-flow-centred")


def verdicts(cells: Cells) -> list[str]:
    """One line per claim and statistics batch, for the recommended BKN (plain and centred)."""
    lines = []
    gn, top = strongest(cells, "gn"), strongest(cells, "none")
    for label in VERDICT_LABELS:
        for s in sizes(cells):
            flow, ghost = cells.get((label, s)), cells.get(("bn", s))
            if flow is None:
                continue
            parts = []
            for mode in ("moving", "batch"):
                for other in (ghost, gn, top):
                    if other is not None:
                        what = difference(flow, other, mode).text()
                        parts.append(f"vs {name(other.label)} {what} ({mode})")
            closed = gap_closed(cells, flow, s)
            if closed is not None:
                parts.append(f"closes {closed:.0%} of ghost BN's gap to BN@128")
            lines.append(f"- s = {s}, {name(label)} ({seeds(flow)}): " + "; ".join(parts))
    return lines


def seeds(cell: Cell) -> str:
    return f"{cell.seeds} seed{'s' if cell.seeds != 1 else ''}"


def recommendation(
    cells: Cells, step_time: Mapping[str, float], searched: Cells | None = None
) -> list[str]:
    """Per s: the candidate with the highest mean accuracy in its best evaluation (a pick from
    fewer than 3 seeds is marked provisional), each candidate at its searched setting
    where the search covered it (``searched``), else at the recipe's; its cost in step time
    where a benchmark was given."""
    lines = [
        "| s | pick | setting | evaluate with | accuracy | seeds | runner-up | "
        "step time vs ghost BN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    searched = searched or {}
    for s in sizes(cells):
        ranked = []
        for label in CANDIDATES:
            cell = cell_at(searched, label, s) or cell_at(cells, label, s)
            if cell is not None:
                mode = best_mode(cell)
                ranked.append((cell.mean(mode), label, cell, mode))
        if not ranked:
            continue
        ranked.sort(reverse=True)
        _, label, cell, mode = ranked[0]
        runner = ranked[1] if len(ranked) > 1 else None
        call = difference(cell, runner[2], mode).call if runner else ""
        runner_text = f"{name(runner[1])} ({call})" if runner else "-"
        cost = step_time.get(label)
        provisional = "" if cell.seeds >= 3 else " (provisional)"
        setting = "its held-out pick" if cell_at(searched, label, s) is cell else "the recipe's 0.1"
        lines.append(
            f"| {s} | {name(label)}{provisional} | {setting} | {MODE_TEXT[mode]} | "
            f"{accuracy(cell, mode)} | {cell.seeds} | {runner_text} | "
            f"{'-' if cost is None else f'{cost:.2f}x'} |"
        )
    return lines


def write_residual_report(findings: ResidualFindings, path: str | Path) -> Path:
    path = Path(path)
    cells = findings.cells
    out = ["# Micro-batch normalisation on a residual network, re-measured", ""]
    out += [f"- **{key}**: {value}" for key, value in findings.header.items()]
    out += [""] + [f"- {note}" for note in findings.notes]
    if findings.failures:
        out += ["", "**Runs that failed** (their cells are missing below):", ""]
        out += [f"- {failure}" for failure in findings.failures]
    searched_sizes = ", ".join(f"s = {size}" for size in sizes(findings.searched)) or "nowhere"
    out += [
        "",
        "## Verdict",
        "",
        "A difference counts only beyond twice its standard error over seeds (moving "
        "statistics); with one seed there is no error estimate.",
        "",
        *verdicts(cells),
        "",
        "## What to use",
        "",
        "Among ghost BN, GN (default groups; and with its groups searched), MABN and bkn-flow "
        "(also with MABN's centred weights), each "
        "at its held-out setting where it was "
        f"searched ({searched_sizes}), else at the recipe's; the evaluation is the one with the "
        "highest mean, picked on these test results (a guide, not a tuned choice); the runner-up "
        "call is at that evaluation; a pick from fewer than 3 seeds is provisional. Step time: "
        "one training step of the ResNet-20 at s = 2 over ghost BN's, measured by "
        "`python experiments/residual_step.py` (its file beside the runs says where and when).",
        "",
        *recommendation(cells, findings.step_time, findings.searched),
        "",
        "BKN's and ghost BN's default eval mode (`eval_statistics=\"auto\"`) is the test group's "
        "batch statistics at s = 1 (each sample's own) and the moving statistics at larger s.",
        "",
        "## Accuracy",
        "",
        "Final test accuracy (%), mean ± std over seeds, every norm with the one recipe (lr 0.1); "
        "verdicts against ghost BN at the same s and against the GN and the BN@128 rows with the "
        "highest mean, "
        "moving statistics; the gap "
        "closed is left blank where BN@128's lead over ghost BN is within noise.",
        "",
        *table(cells),
    ]
    if findings.searched:
        out += [
            "",
            "## Each norm at its own learning rate",
            "",
            "The norms of the learning-rate search, each trained with its held-out pick (seeds "
            "in the table) and compared as above:",
            "",
            *verdicts(findings.searched),
            "",
            *table(findings.searched),
        ]
    if findings.search:
        out += ["", "## Learning-rate search", "", *findings.search]
    if findings.figure:
        out += ["", f"![accuracy against the statistics batch]({findings.figure})"]
    if findings.secondary:
        out += ["", "## The quick check", "", findings.secondary]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path
