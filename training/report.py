"""The end-of-run artefacts: ``report.json`` (every figure a claim needs), ``curves.png`` and ``confusion.png``.

Accuracy alone hides a model that ignores its rare classes (72% on a 57/11/4/27 split with 0% recall on two
classes): every evaluated split also gets its macro accuracy (mean per-class recall), per-class precision,
recall and support, and its confusion matrix, computed by scikit-learn. Matplotlib runs on the Agg backend:
no display is needed, and nothing changes the caller's backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from repadapter.atomic import write_file_atomic

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
PLOT_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"


def class_figures(labels: ArrayLike, predicted: ArrayLike, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro accuracy, per-class precision/recall/support and the confusion matrix of one split.

    ``confusion_matrix[i][j]`` counts images of class ``i`` predicted as ``j`` (rows and columns in the order
    of ``classes``). Macro accuracy is the mean recall over the classes present in the split (scikit-learn's
    balanced accuracy): a model that never predicts a rare class loses that class's whole share.
    """
    ids = list(range(len(classes)))
    precision, recall, _, support = precision_recall_fscore_support(labels, predicted, labels=ids, zero_division=0)
    present = support > 0
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": [{"label": c, "precision": float(p), "recall": float(r), "support": int(n)}
                      for c, p, r, n in zip(classes, precision, recall, support, strict=True)],
        "confusion_matrix": confusion_matrix(labels, predicted, labels=ids).tolist(),
    }


def class_table(figures: dict[str, Any]) -> str:
    """A fixed-width per-class table (label, precision, recall, support) for the log."""
    width = max(12, *(len(row["label"]) for row in figures["per_class"]))
    lines = [f"{'class':<{width}}  precision  recall  support"]
    lines += [f"{row['label']:<{width}}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['support']:>7d}"
              for row in figures["per_class"]]
    lines.append(f"{'accuracy':<{width}}  {'':>9}  {figures['accuracy']:>6.3f}")
    lines.append(f"{'macro acc.':<{width}}  {'':>9}  {figures['macro_accuracy']:>6.3f}")
    return "\n".join(lines)


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


def plot_confusion(path: Path, figures: dict[str, Any], title: str) -> None:
    """The confusion matrix as a heat map, each row normalised by its true-class count, cells labelled
    with the share and the count (a rare class's row reads as clearly as a frequent one's)."""
    counts = np.asarray(figures["confusion_matrix"], dtype=np.int64)  # [true C, predicted C]
    labels = [row["label"] for row in figures["per_class"]]
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(4 + 0.6 * len(labels), 24)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted class", ylabel="true class",
           title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    if len(labels) <= 30:  # beyond that, numbers in the cells are unreadable
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, f"{shares[i, j]:.0%}\n{n}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    log.info("plot written path=%s", path)
