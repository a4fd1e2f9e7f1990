"""A budget of ``kalmannorm reproduce``: the grids it trains under one folder and the analyses'
data (the budgets themselves: :mod:`kalmannorm.lab.reproduce.budgets`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kalmannorm.lab.train.compare import CompareConfig

#: Statistics batch at which BN is widened to BKN's parameter count (the paper's Table 3).
TABLE3_STAT_BATCH = 2


@dataclass
class Budget:
    """The grids of a budget (by name, each with its own ``out`` folder under ``root``), the
    analysis settings and the report's default folder."""

    name: str
    root: Path
    grids: dict[str, CompareConfig]
    analysis_samples: int | None  # training images read by the statistics analyses (None: all)
    table3_stat_batch: int = TABLE3_STAT_BATCH
    notes: list[str] = field(default_factory=list)
    report_dir: Path = Path("docs/results")  # where REPORT.md goes unless --out says
    #: Grids of options since removed from the library: the report reads their finished runs,
    #: ``reproduce`` never trains them (the commit that measured them is in the notes).
    retired: dict[str, CompareConfig] = field(default_factory=dict)
