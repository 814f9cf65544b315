"""The end-of-run artefacts: ``report.json`` (every figure a claim needs) and ``curves.png``.

Matplotlib runs on the Agg backend: no display is needed, and nothing changes the caller's backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from repadapter.atomic import write_file_atomic

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
PLOT_FILE = "curves.png"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a report)."""
    write_file_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def plot_curves(path: Path, history: list[dict[str, Any]], title: str,
                search: list[dict[str, Any]] | None = None) -> None:
    """Loss and accuracy per epoch (train and validation); with a scale search, val accuracy per scale."""
    panels = 3 if search and len(search) > 1 else 2
    fig = Figure(figsize=(5 * panels, 4), layout="constrained")  # Agg canvas, no pyplot state
    axes = fig.subplots(1, panels)
    epochs = [h["epoch"] for h in history]
    for ax, metric in zip(axes[:2], ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], marker="o", label="train")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], marker="o", label="validation")
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if panels == 3:
        assert search is not None
        ax = axes[2]
        ax.plot([t["scale"] for t in search], [t["val_accuracy"] for t in search], marker="o")
        ax.set(xscale="log", xlabel="adapter scale s", ylabel="val accuracy", title="scale search")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    log.info("plot written path=%s", path)
