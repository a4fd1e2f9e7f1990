"""Plain statements from measured numbers: is one norm better than another, beyond seed noise?

Two cells differ when their mean final accuracies are further apart than twice the standard
error of the difference, sqrt(sem_a^2 + sem_b^2) (about a 95 % interval under a normal
approximation; with 3 seeds it is a rough guide, and the report says so). With one seed there is
no error estimate and every difference is reported as "not measurable".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kalmannorm.lab.reproduce.evidence import Cell

#: Difference in standard errors beyond which two cells are called different.
Z = 2.0


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) in percentage points, its standard error and the call."""

    points: float
    stderr: float
    call: str  # "better", "worse", "tie" or "not measurable"

    def text(self) -> str:
        if self.call == "not measurable":
            return f"{self.points:+.2f} pt (one seed: no error estimate)"
        return f"{self.points:+.2f} ± {self.stderr:.2f} pt ({self.call})"


def difference(a: Cell, b: Cell, mode: str = "moving") -> Difference:
    """How ``a`` compares with ``b`` (final test accuracy, ``mode`` statistics)."""
    points = 100 * (a.mean(mode) - b.mean(mode))
    if a.seeds < 2 or b.seeds < 2:
        return Difference(points, math.nan, "not measurable")
    stderr = 100 * math.hypot(a.sem(mode), b.sem(mode))
    if abs(points) <= Z * stderr:
        call = "tie"
    else:
        call = "better" if points > 0 else "worse"
    return Difference(points, stderr, call)


def summarise_calls(calls: dict[int | str, Difference]) -> str:
    """'better at s = 1, 2; tie at 4, 8; worse at 128' from calls keyed by setting."""
    parts = []
    for call in ("better", "tie", "worse", "not measurable"):
        keys = [str(k) for k, d in calls.items() if d.call == call]
        if keys:
            parts.append(f"{call} at {', '.join(keys)}")
    return "; ".join(parts) if parts else "no common settings"
