"""Training, a mini VTAB-1k of our own: RepAdapter vs linear probe vs full fine-tuning on real data.

Protocol: 800 train / 200 val images per dataset (seeded, stratified), test on the dataset's held-out test
split (2,000 images), the embedded pretrained MobileNetV2 at 96 px, the paper's recipe (AdamW 1e-3,
cosine with warm-up, batch 64). Each run is a separate ``python -m training`` process, so its peak RSS is
its own; time per epoch for the linear probe includes the one-off feature extraction spread over its
epochs (it trains on cached features). The paper's ViT-B/16 VTAB-1k figures are the reference:
RepAdapter 76.1 (mean of groups) vs full tuning 69.0, with ~25% less training time and ~20% less memory.

    python -m bench.training [--quick] [--datasets fashion-mnist,mnist,digits] [--epochs 10]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import ROOT, cli, markdown, plots

TITLE = "Training: RepAdapter vs linear probe vs full fine-tuning (mini VTAB-1k)"
NAME = "training"
METHODS = ("repadapter", "linear", "full")
FULL = {"datasets": ["fashion-mnist", "mnist", "digits"], "epochs": 10, "n_train": 800, "n_val": 200,
        "n_test": 2000, "image_size": 96}
QUICK = {"datasets": ["digits"], "epochs": 1, "n_train": 40, "n_val": 20, "n_test": 40, "image_size": 32}


def train_once(dataset: str, method: str, size: dict[str, Any], store: Path, threads: int,
               seed: int) -> dict[str, Any]:
    """One ``python -m training`` run in its own process; returns its metrics."""
    argv = [sys.executable, "-m", "training", "--data", dataset, "--task", f"b-{method}-{dataset}"[:64],
            "--method", method, "--store", str(store), "--out-dir", str(store.parent / "runs"),
            "--epochs", str(size["epochs"]), "--n-train", str(size["n_train"]), "--n-val", str(size["n_val"]),
            "--n-test", str(size["n_test"]), "--image-size", str(size["image_size"]), "--seed", str(seed),
            "--overwrite"]
    env = {**cli.child_env(), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    metrics = json.loads(done.stdout)["metrics"]
    per_epoch = (metrics["train_seconds"] + metrics.get("feature_seconds", 0.0)) / metrics["epochs"]
    return {"dataset": dataset, "method": method, "test_accuracy": metrics["test_accuracy"],
            "val_accuracy": metrics["val_accuracy"], "trainable_params": metrics["trainable_params"],
            "seconds_per_epoch": per_epoch, "peak_memory_mib": metrics["peak_memory_mib"],
            "peak_memory_kind": metrics["peak_memory_kind"],
            "merged_argmax_agreement": metrics.get("merged_argmax_agreement")}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--datasets", type=cli.csv(), help="fashion-mnist, mnist, digits or ImageFolder dirs")
    p.add_argument("--epochs", type=int, help="epochs per run (default 10; quick: 1)")
    args = p.parse_args(argv)
    run = cli.Run(NAME, args, argv)
    size = dict(QUICK if args.quick else FULL)
    size["datasets"] = args.datasets or size["datasets"]
    size["epochs"] = args.epochs or size["epochs"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        for dataset in size["datasets"]:
            for method in METHODS:
                run.log.info("training dataset=%s method=%s epochs=%d", dataset, method, size["epochs"])
                rows.append(train_once(dataset, method, size, store, args.threads, args.seed))
                run.log.info("  %s", rows[-1])
    summary = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        full = [r for r in rows if r["method"] == "full"]
        summary[method] = {
            "mean_test_accuracy": statistics.fmean(r["test_accuracy"] for r in mine),
            "time_vs_full": statistics.median(a["seconds_per_epoch"] / b["seconds_per_epoch"]
                                              for a, b in zip(mine, full, strict=True)),
            "memory_vs_full": statistics.median(a["peak_memory_mib"] / b["peak_memory_mib"]
                                                for a, b in zip(mine, full, strict=True)),
        }
    run.note("Peak memory is the training process's peak RSS on CPU (CUDA max allocated on GPU): it includes "
             "the Python/torch runtime and the dataset, common to all methods.")
    run.note("Each configuration ran once (one seed): accuracy differences of ~1 point on 2,000 test images "
             "are within noise.")
    return run.finish(size, {"rows": rows, "summary": summary}, render, plot)


def render(payload: dict[str, Any]) -> str:
    res = payload["results"]
    rows = [[r["dataset"], r["method"], f"{100 * r['test_accuracy']:.1f}", f"{100 * r['val_accuracy']:.1f}",
             f"{r['trainable_params']:,}", f"{r['seconds_per_epoch']:.1f} s", f"{r['peak_memory_mib']:.0f} MiB",
             "" if r["merged_argmax_agreement"] is None else f"{100 * r['merged_argmax_agreement']:.0f}%"]
            for r in res["rows"]]
    summary = [[m, f"{100 * s['mean_test_accuracy']:.1f}", f"x{s['time_vs_full']:.2f}", f"x{s['memory_vs_full']:.2f}"]
               for m, s in res["summary"].items()]
    cfg = payload["config"]
    return "\n".join([
        f"{cfg['n_train']} train / {cfg['n_val']} val / {cfg['n_test']} test images per dataset, "
        f"{cfg['image_size']} px, {cfg['epochs']} epochs, embedded MobileNetV2.", "",
        markdown.md_table(["dataset", "method", "test acc %", "val acc %", "trainable params", "time / epoch",
                         "peak memory", "served = trained (argmax)"], rows),
        "", "Mean over datasets, and medians of per-dataset ratios to full fine-tuning:", "",
        markdown.md_table(["method", "mean test acc %", "time / epoch vs full", "peak memory vs full"], summary),
        "", PAPER, "", _timing_noise(res["rows"]),
    ])


PAPER = ("The paper's figures for reference (ViT-B/16, VTAB-1k, GPU): RepAdapter 76.1 mean of groups vs full "
         "tuning 69.0, with ~25% less training time and ~20% less memory than full tuning. Its savings come from "
         "not computing or storing weight gradients and optimizer state for 86M parameters; the embedded "
         "MobileNetV2 has 2.2M, so here those are a few MiB, while every method except the linear probe still "
         "back-propagates through the whole network (the first adapter sits in the first block), and "
         "activations dominate time and memory.")


def _timing_noise(rows: list[dict[str, Any]]) -> str:
    """One method's time per epoch across datasets: the same computation (image count and size are equal),
    so its spread is the run-to-run noise that a time ratio between two runs carries."""
    by_method: dict[str, list[float]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["seconds_per_epoch"])
    spreads = {m: max(v) / min(v) for m, v in by_method.items() if len(v) > 1 and m != "linear"}
    if not spreads:
        return "Each configuration ran once: time ratios carry the run-to-run noise of one run."
    text = ", ".join(f"{m} x{s:.2f}" for m, s in spreads.items())
    return (f"Time per epoch is one run per configuration, one after the other. The same method does the same "
            f"work on every dataset (same image count and size), so its max/min over datasets is the run-to-run "
            f"noise: {text}. Time ratios closer to 1 than that are not a measured difference.")


def plot(payload: dict[str, Any], path: Path) -> None:
    """Test accuracy per dataset and method (bars), the paper's comparison at a glance."""
    rows = payload["results"]["rows"]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plots.subplots(2, 1, width=4.6)
    width = 0.8 / len(METHODS)
    for k, method in enumerate(METHODS):
        xs = [i + k * width for i in range(len(datasets))]
        by = {r["dataset"]: r for r in rows if r["method"] == method}
        axes[0][0].bar(xs, [100 * by[d]["test_accuracy"] for d in datasets], width, label=method)
        axes[0][1].bar(xs, [by[d]["seconds_per_epoch"] for d in datasets], width, label=method)
    for ax, label in ((axes[0][0], "test accuracy %"), (axes[0][1], "seconds / epoch")):
        ax.set_xticks([i + width for i in range(len(datasets))], datasets)
        ax.set(ylabel=label)
        ax.legend(fontsize=7)
    plots.save_figure(fig, path)


if __name__ == "__main__":
    main()
