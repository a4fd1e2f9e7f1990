"""Summarise a `kalmannorm compare` folder: per norm and statistics batch, mean +- std over seeds
of the final test accuracy (moving, batch and, where measured, precise-BN statistics), the
fraction of ghost BN's gap to BN@128 each closes, and the 2-standard-error verdict against ghost
BN and GroupNorm (docs/results/REPORT.md's rule).

Usage: python experiments/grid_table.py RUNS_FOLDER [--out docs/results/residual.md]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from pathlib import Path

MODES = ("moving", "batch", "precise")


def load(folder: Path) -> dict[tuple[str, str], dict[str, list[float]]]:
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for summary in sorted(folder.glob("*/summary.json")):
        match = re.fullmatch(r"(.+)-s(\w+)-seed(\d+)", summary.parent.name)
        if match is None:
            continue
        data = json.loads(summary.read_text())
        if data.get("status") != "finished":
            continue
        label, stat = match.group(1), match.group(2)
        cell = cells.setdefault((label, stat), {m: [] for m in MODES})
        for mode in MODES:
            value = data["final"].get(f"test_acc_{mode}")
            if value is not None:
                cell[mode].append(100 * value)
    return cells


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def verdict(a: list[float], b: list[float]) -> str:
    if len(a) < 2 or len(b) < 2:
        return "-"
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.hypot(
        statistics.stdev(a) / math.sqrt(len(a)), statistics.stdev(b) / math.sqrt(len(b))
    )
    call = "tie" if abs(diff) <= 2 * se else ("better" if diff > 0 else "worse")
    return f"{diff:+.2f} ({call})"


def table(cells: dict, reference: str = "none") -> tuple[str, list[dict]]:
    ref = next((v for (label, _), v in cells.items() if label == reference), None)
    rows, lines = [], []
    header = ("| norm | s | seeds | moving | batch | precise | gap closed (moving) "
              "| vs ghost BN | vs GN |")  # fmt: skip
    lines += [header, "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(cells, key=lambda k: (k[1] != "all", k[1], k[0] != "bn", k[0]))
    for label, stat in order:
        cell = cells[(label, stat)]
        ghost = cells.get(("bn", stat))
        gn = cells.get(("gn", "all"))
        stats = {m: mean_std(cell[m]) for m in MODES}
        closed = "-"
        if ref and ghost and label not in ("bn", reference) and stat != "all":
            top, bottom = statistics.fmean(ref["moving"]), statistics.fmean(ghost["moving"])
            if top != bottom:
                closed = f"{(stats['moving'][0] - bottom) / (top - bottom):+.0%}"
        best = max(("moving", "batch"), key=lambda m: stats[m][0] if cell[m] else -1)
        vs_ghost = verdict(cell[best], ghost[best]) if ghost and label != "bn" else "-"
        vs_gn = verdict(cell[best], gn["moving"]) if gn and label != "gn" else "-"
        fmt = {m: ("-" if math.isnan(stats[m][0]) else f"{stats[m][0]:.2f} ± {stats[m][1]:.2f}")
               for m in MODES}  # fmt: skip
        lines.append(f"| {label} | {stat} | {len(cell['moving'])} | {fmt['moving']} | "
                     f"{fmt['batch']} | {fmt['precise']} | {closed} | {vs_ghost} | {vs_gn} |")
        rows.append({"norm": label, "s": stat, "seeds": len(cell["moving"]),
                     **{f"{m}_mean": stats[m][0] for m in MODES},
                     **{f"{m}_std": stats[m][1] for m in MODES}})  # fmt: skip
    return "\n".join(lines), rows


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = [r for r in rows if not math.isnan(r["moving_mean"])]
    fig, axes = plt.subplots(figsize=(max(6, 0.8 * len(shown)), 3.6))
    xs = range(len(shown))
    for offset, mode in ((-0.2, "moving"), (0.2, "batch")):
        axes.bar([x + offset for x in xs], [r[f"{mode}_mean"] for r in shown], 0.4,
                 yerr=[0 if math.isnan(r[f"{mode}_std"]) else r[f"{mode}_std"] for r in shown],
                 label=f"{mode} statistics", capsize=2)  # fmt: skip
    axes.set_xticks(list(xs), [f"{r['norm']}\ns={r['s']}" for r in shown], fontsize=7)
    low = min(min(r["moving_mean"], r["batch_mean"]) for r in shown)
    axes.set_ylim(max(0, low - 5), 100 if low > 90 else None)
    axes.set_ylabel("final test accuracy (%)")
    axes.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figure", type=Path, help="a bar chart of the moving/batch accuracies")
    args = parser.parse_args()
    text, rows = table(load(args.folder))
    print(text)
    if args.figure:
        figure(rows, args.figure)
    if args.out:
        args.out.write_text(text + "\n")
        with args.out.with_suffix(".csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
