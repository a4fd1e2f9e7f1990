"""Lazy access to matplotlib for the PNG writers (matplotlib is an optional dependency).

Figures are built with :class:`matplotlib.figure.Figure` directly, not ``pyplot``, so writing a
PNG neither selects nor disturbs the caller's matplotlib backend and needs no display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def require_matplotlib() -> Any:
    """Import matplotlib, or raise an ImportError that says how to install it."""
    try:
        import matplotlib
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError as error:
        raise ImportError(
            "writing analysis plots needs matplotlib, which is not installed: "
            "pip install matplotlib"
        ) from error
    return matplotlib


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of the given size in inches, detached from pyplot."""
    matplotlib = require_matplotlib()
    return matplotlib.figure.Figure(figsize=(width, height), layout="constrained")


def save_figure(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``figure`` as PNG to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    return path
