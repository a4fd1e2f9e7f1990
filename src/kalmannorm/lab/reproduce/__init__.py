"""``kalmannorm reproduce``: the paper's evidence re-measured, as a report.

``budgets`` (what is trained), ``evidence`` (what is read and measured from the runs),
``verdict`` (differences beyond seed noise), ``figures`` and ``report`` (REPORT.md), ``runner``
(the command). ``paper_numbers`` holds the published values set beside ours.
"""

from kalmannorm.lab.reproduce.budget import Budget
from kalmannorm.lab.reproduce.budgets import BUDGETS
from kalmannorm.lab.reproduce.runner import reproduce

__all__ = ["BUDGETS", "Budget", "reproduce"]
