"""The benchmarks' figures: matplotlib on the Agg backend (no display), imported only when a plot is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def subplots(n: int, rows: int = 1, *, width: float = 4.2, height: float = 3.4) -> tuple[Any, Any]:
    """A ``rows x n`` grid of matplotlib axes (2-D array) on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, n, figsize=(width * n, height * rows), squeeze=False)


def log_axes(ax: Any, *, x: bool = False, y: bool = True, xticks: Sequence[float] | None = None) -> None:
    """Log scales with plain-number labels (``20``, not ``2x10^1``), optionally exactly ``xticks`` on x."""
    from matplotlib.ticker import LogFormatter, NullLocator

    for on, axis, scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        if on:
            scale("log")
            axis.set_major_formatter(LogFormatter())
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # labels minors on short ranges
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
        ax.xaxis.set_minor_locator(NullLocator())


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
