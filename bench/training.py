"""Training, a mini VTAB-1k of our own: RepAdapter vs linear probe vs full fine-tuning on real data, over seeds;
and the cost of one training step of each method on a ViT, where the paper's savings should appear.

Protocol: 800 train / 200 val images per dataset (seeded, stratified), test on the dataset's held-out test
split (2,000 images), the embedded pretrained MobileNetV2 at 96 px, the paper's recipe (AdamW 1e-3,
cosine with warm-up, batch 64), seeds 1-3 (a seed draws the split, the initialisation and the data order).
Each run is a separate ``python -m training`` process, so its peak RSS is its own; time per epoch for the
linear probe includes the one-off feature extraction spread over its epochs (it trains on cached features).
``--variant NAME='FLAGS'`` adds a RepAdapter configuration (training CLI flags) to compare. The ViT rows
come from :mod:`bench.train_step`, one process per method. The paper's ViT-B/16 VTAB-1k figures are the
reference: RepAdapter 76.1 (mean of groups) vs full tuning 69.0, with ~25% less training time and ~20% less
memory.

    python -m bench.training [--quick] [--datasets fashion-mnist,mnist,digits] [--epochs 10] [--seeds 1,2,3]
        [--jobs 2] [--variant lr3e-3='--lr 3e-3'] [--vit-arch vit_small_patch16_224]
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import ROOT, cli, markdown, plots

TITLE = "Training: RepAdapter vs linear probe vs full fine-tuning (mini VTAB-1k)"
NAME = "training"
METHODS = ("repadapter", "linear", "full")
FULL = {"datasets": ["fashion-mnist", "mnist", "digits"], "epochs": 10, "n_train": 800, "n_val": 200,
        "n_test": 2000, "image_size": 96, "seeds": [1, 2, 3]}
QUICK = {"datasets": ["digits"], "epochs": 1, "n_train": 40, "n_val": 20, "n_test": 40, "image_size": 32,
         "seeds": [0]}
VIT = {"arch": "vit_small_patch16_224", "image_size": 96, "batch": 32, "steps": 5, "warmup": 2}
VIT_QUICK = {"arch": "vit_tiny_patch16_224", "image_size": 32, "batch": 4, "steps": 1, "warmup": 1}
def _breakdown(ours: dict[str, Any], full: dict[str, Any]) -> str:
    """Where RepAdapter's step saves and spends against full tuning's, phase by phase."""
    a, b = ours["seconds"], full["seconds"]
    same_forward = (b["forward"] + a["backward"] + a["optimizer"]) / b["step"]
    return (f"Per phase against full tuning: backward x{a['backward'] / b['backward']:.2f} (no weight gradients), "
            f"optimizer x{a['optimizer'] / b['optimizer']:.2f} (no AdamW update of the backbone), forward "
            f"x{a['forward'] / b['forward']:.2f} (the adapters' own work, their hooks and dropout); with full "
            f"tuning's forward the step would be x{same_forward:.2f}. Memory: no weight gradients or AdamW moments "
            f"({full['grad_and_optimizer_state_mib'] - ours['grad_and_optimizer_state_mib']:.0f} MiB less), the "
            "adapters' activations kept for the backward pass on top.")


PAPER_RECIPE = ("--recipe", "paper")
"""The three methods' rows train with the paper's recipe, whatever the training CLI's default; variants name theirs."""
TIME_GOAL, MEMORY_GOAL = 0.75, 0.8
"""The issue's goal for RepAdapter's ViT training step against full tuning's: time and memory ratios."""


def train_once(dataset: str, config: str, method: str, flags: Sequence[str], size: dict[str, Any], store: Path,
               threads: int, seed: int) -> dict[str, Any]:
    """One ``python -m training`` run in its own process; returns its figures (the test confusion matrix too)."""
    task = f"b-{config}-{dataset}-{seed}".replace(".", "_")[:64]
    argv = [sys.executable, "-m", "training", "--data", dataset, "--task", task, "--method", method,
            "--store", str(store), "--out-dir", str(store.parent / "runs" / task), "--epochs", str(size["epochs"]),
            "--n-train", str(size["n_train"]), "--n-val", str(size["n_val"]), "--n-test", str(size["n_test"]),
            "--image-size", str(size["image_size"]), "--seed", str(seed), "--overwrite", "--no-progress", *flags]
    summary = _child_json(argv, {"OMP_NUM_THREADS": str(threads)})
    metrics, test = summary["metrics"], summary["evaluation"].get("test", {})
    per_epoch = (metrics["train_seconds"] + metrics.get("feature_seconds", 0.0)) / metrics["epochs"]
    return {"dataset": dataset, "config": config, "method": method, "flags": list(flags), "seed": seed,
            "test_accuracy": metrics["test_accuracy"], "test_macro_accuracy": metrics["test_macro_accuracy"],
            "val_accuracy": metrics["val_accuracy"], "trainable_params": metrics["trainable_params"],
            "seconds_per_epoch": per_epoch, "peak_memory_mib": metrics["peak_memory_mib"],
            "peak_memory_kind": metrics["peak_memory_kind"], "scale": metrics["scale"],
            "merged_argmax_agreement": metrics.get("merged_argmax_agreement"),
            "confusion_matrix": test.get("confusion_matrix")}


def step_cost(method: str, vit: dict[str, Any], device: str, threads: int) -> dict[str, Any]:
    """One method's ViT training step (:mod:`bench.train_step`) in its own process."""
    argv = [sys.executable, "-m", "bench.train_step", "--method", method, "--arch", vit["arch"],
            "--image-size", str(vit["image_size"]), "--batch", str(vit["batch"]), "--steps", str(vit["steps"]),
            "--warmup", str(vit["warmup"]), "--device", device, "--threads", str(threads)]
    return _child_json(argv)


def _child_json(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv`` from the repo root and return the JSON it prints; a failure raises with its stderr's tail."""
    done = subprocess.run(argv, cwd=ROOT, env={**cli.child_env(), **(env or {})}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAGS`` -> ``(NAME, [flags])``: a RepAdapter configuration under its own name."""
    name, sep, flags = text.partition("=")
    if not sep or not name or name in METHODS:
        raise ValueError(f"--variant wants NAME='--flag value ...' with a new name, got {text!r}")
    return name, shlex.split(flags)


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(rows: list[dict[str, Any]], configs: Sequence[str]) -> dict[str, Any]:
    """Per (dataset, configuration): accuracy over seeds; per configuration: the dataset mean over seeds, and
    medians of time and memory ratios to full tuning's run of the same dataset and seed."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    at = {(r["dataset"], r["config"], r["seed"]): r for r in rows}
    cells, overall = [], {}
    for config in configs:
        for dataset in datasets:
            mine = [at[dataset, config, s] for s in seeds]
            cells.append({"dataset": dataset, "config": config, **{
                key: _spread([r[key] for r in mine]) for key in ("test_accuracy", "test_macro_accuracy",
                                                                 "val_accuracy")}})
        entry: dict[str, Any] = {key: _spread([statistics.fmean(at[d, config, s][key] for d in datasets)
                                               for s in seeds]) for key in ("test_accuracy", "test_macro_accuracy")}
        if "full" in configs:
            pairs = [(at[d, config, s], at[d, "full", s]) for d in datasets for s in seeds]
            entry["time_vs_full"] = statistics.median(a["seconds_per_epoch"] / b["seconds_per_epoch"] for a, b in pairs)
            entry["memory_vs_full"] = statistics.median(a["peak_memory_mib"] / b["peak_memory_mib"] for a, b in pairs)
        overall[config] = entry
    return {"cells": cells, "overall": overall}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--datasets", type=cli.csv(), help="fashion-mnist, mnist, digits or ImageFolder dirs")
    p.add_argument("--epochs", type=int, help="epochs per run (default 10; quick: 1)")
    p.add_argument("--seeds", type=cli.csv(int), help="seeds, each a full set of runs (default 1,2,3; quick: 0)")
    p.add_argument("--methods", type=cli.csv(), default=list(METHODS), help="methods run (default: all three)")
    p.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME='FLAGS'",
                   help="a RepAdapter configuration with these training flags, e.g. lr3e-3='--lr 3e-3' (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="training processes at once (threads are split among them; "
                                                       "time figures then share the machine)")
    p.add_argument("--vit-arch", help=f"timm ViT of the step-cost rows (default {VIT['arch']}; 'none' skips them)")
    args = p.parse_args(argv)
    run = cli.Run(NAME, args, argv)
    size = dict(QUICK if args.quick else FULL)
    size["datasets"] = args.datasets or size["datasets"]
    size["epochs"] = args.epochs or size["epochs"]
    size["seeds"] = args.seeds or size["seeds"]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    configs = [(m, m, list(PAPER_RECIPE)) for m in METHODS if m in args.methods]
    configs += [(n, "repadapter", f) for n, f in args.variant]
    size["configs"] = {name: flags for name, _, flags in configs}
    threads = max(1, args.threads // max(1, args.jobs))
    rows = _train_all(run, size, configs, threads, args.jobs)
    vit = dict(VIT_QUICK if args.quick else VIT) | ({"arch": args.vit_arch} if args.vit_arch else {})
    vit_rows = [] if vit["arch"] == "none" else _vit_rows(run, vit, args.threads)
    size["vit"] = vit
    run.note("Peak memory is the training process's peak RSS on CPU (CUDA max allocated on GPU): it includes "
             "the Python/torch runtime and the dataset, common to all methods.")
    if args.jobs > 1:
        run.note(f"{args.jobs} training processes ran at once ({threads} thread(s) each): their time per epoch "
                 "shares the machine; the ViT step rows ran alone.")
    results = {"rows": rows, "summary": summarise(rows, list(size["configs"])), "vit": vit_rows}
    return run.finish(size, results, render, plot)


def _train_all(run: cli.Run, size: dict[str, Any], configs: list[tuple[str, str, list[str]]], threads: int,
               jobs: int) -> list[dict[str, Any]]:
    """Every (dataset, configuration, seed) run, ``jobs`` at a time, in a fixed order whatever finishes first."""
    plan = [(d, c, m, f, s) for s in size["seeds"] for d in size["datasets"] for c, m, f in configs]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, jobs)) as pool:
        store = Path(tmp) / "store"

        def one(k: int, item: tuple[str, str, str, list[str], int]) -> dict[str, Any]:
            dataset, config, method, flags, seed = item
            row = train_once(dataset, config, method, flags, size, store, threads, seed)
            run.log.info("[%d/%d] dataset=%s config=%s seed=%d test_acc=%.4f macro=%.4f %.1f s/epoch", k + 1,
                         len(plan), dataset, config, seed, row["test_accuracy"], row["test_macro_accuracy"],
                         row["seconds_per_epoch"])
            return row

        return list(pool.map(one, range(len(plan)), plan))


def _vit_rows(run: cli.Run, vit: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        run.log.info("ViT step cost: %s method=%s", vit["arch"], method)
        rows.append(step_cost(method, vit, run.device.type, threads))
    full = next(r for r in rows if r["method"] == "full")
    for r in rows:
        r["step_vs_full"] = r["seconds"]["step"] / full["seconds"]["step"]
        r["memory_vs_full"] = r["step_memory_mib"] / full["step_memory_mib"]
    return rows


def _pct(s: dict[str, float]) -> str:
    """``mean (min-max)`` in percent; the bare mean for a single seed."""
    if s["n"] == 1:
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ({100 * s['min']:.1f}-{100 * s['max']:.1f})"


def render(payload: dict[str, Any]) -> str:
    res, cfg = payload["results"], payload["config"]
    summary, rows = res["summary"], res["rows"]
    seeds = cfg["seeds"]
    flags = {name: shlex.join(f) for name, f in cfg["configs"].items() if f}
    by = _group(rows)
    cells = [[c["dataset"], c["config"], _pct(c["test_accuracy"]), _pct(c["test_macro_accuracy"]),
              _pct(c["val_accuracy"]), f"{_median(by[c['dataset'], c['config']], 'seconds_per_epoch'):.1f} s",
              f"{_median(by[c['dataset'], c['config']], 'peak_memory_mib'):.0f} MiB", _agreement(by[c['dataset'],
                                                                                                    c['config']])]
             for c in summary["cells"]]
    overall = [[name, _pct(o["test_accuracy"]), _pct(o["test_macro_accuracy"]),
                f"x{o['time_vs_full']:.2f}" if "time_vs_full" in o else "-",
                f"x{o['memory_vs_full']:.2f}" if "memory_vs_full" in o else "-"]
               for name, o in summary["overall"].items()]
    parts = [
        f"{cfg['n_train']} train / {cfg['n_val']} val / {cfg['n_test']} test images per dataset, "
        f"{cfg['image_size']} px, {cfg['epochs']} epochs, embedded MobileNetV2, seeds {', '.join(map(str, seeds))}: "
        "each figure is the mean over seeds (min-max in brackets).", "",
        _accuracy_goal(summary["overall"]), "",
        markdown.md_table(["dataset", "configuration", "test acc %", "macro acc %", "val acc %", "time / epoch",
                           "peak memory", "served = trained (argmax)"], cells),
        "", "Mean over datasets (per seed, then over seeds), and medians of ratios to full fine-tuning's run of the "
            "same dataset and seed:", "",
        markdown.md_table(["configuration", "mean test acc %", "mean macro acc %", "time / epoch vs full",
                           "peak memory vs full"], overall),
    ]
    if flags:
        parts += ["", "Training flags of each configuration (the variants are RepAdapter): "
                  + "; ".join(f"`{n}`: `{f}`" for n, f in flags.items()) + "."]
    if res.get("vit"):
        parts += ["", _render_vit(res["vit"], cfg["vit"])]
    parts += ["", TRIED, "", PAPER, "", _timing_noise(rows)]
    return "\n".join(parts)


def _group(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["dataset"], r["config"]), []).append(r)
    return by


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _agreement(rows: list[dict[str, Any]]) -> str:
    values = [r["merged_argmax_agreement"] for r in rows]
    return "" if None in values else f"{100 * min(values):.0f}%"


def _accuracy_goal(overall: dict[str, Any]) -> str:
    if "repadapter" not in overall or "full" not in overall:
        return "Goal: RepAdapter's mean test accuracy >= full fine-tuning's (not measured: both are needed)."
    full = overall["full"]["test_accuracy"]["mean"]
    best = max((n for n in overall if n not in ("linear", "full")), key=lambda n: overall[n]["test_accuracy"]["mean"])
    mean = overall[best]["test_accuracy"]["mean"]
    verdict = "met" if mean >= full else f"not met, {100 * (full - mean):.1f} points short"
    return (f"Goal: RepAdapter's mean test accuracy >= full fine-tuning's. Best RepAdapter configuration `{best}` "
            f"{100 * mean:.1f} vs full {100 * full:.1f}: {verdict}.")


def _render_vit(rows: list[dict[str, Any]], vit: dict[str, Any]) -> str:
    ours = next(r for r in rows if r["method"] == "repadapter")
    met = ours["step_vs_full"] <= TIME_GOAL and ours["memory_vs_full"] <= MEMORY_GOAL
    table = [[r["method"], f"{r['trainable_params']:,}", *(f"{1e3 * r['seconds'][k]:.0f} ms" for k in
                                                            ("forward", "backward", "optimizer", "step")),
              f"x{r['step_vs_full']:.2f}", f"{r['step_memory_mib']:.0f} MiB", f"x{r['memory_vs_full']:.2f}",
              f"{r['grad_and_optimizer_state_mib']:.0f} MiB"] for r in rows]
    return "\n".join([
        f"One training step on a ViT (`{vit['arch']}`, randomly initialised: cost does not depend on the weights; "
        f"{vit['image_size']} px, batch {vit['batch']}, median of {vit['steps']} steps after {vit['warmup']}, "
        f"{ours['device']}, {ours['threads']} thread(s)). *Step memory* is what the step adds to the loaded model "
        f"({ours['memory_kind'].replace('_', ' ')}); *grads + AdamW state* is 3x the trainable weights. The linear "
        "probe's step here includes the frozen forward (the training CLI caches those features instead).", "",
        f"Goal: RepAdapter <= x{TIME_GOAL} full tuning's step time and <= x{MEMORY_GOAL} its memory: "
        f"x{ours['step_vs_full']:.2f} time, x{ours['memory_vs_full']:.2f} memory ({'met' if met else 'not met'}). "
        + _breakdown(ours, next(r for r in rows if r["method"] == "full")),
        "", markdown.md_table(["method", "trainable params", "forward", "backward", "optimizer", "step",
                               "step vs full", "step memory", "memory vs full", "grads + AdamW state"], table),
    ])


TRIED = ("What was tried to close the gap (a one-seed pre-screen of every option, then the best on all seeds; "
         "every run is in [training/RESULTS.md](training/RESULTS.md#closing-the-gap-to-full-fine-tuning-recipes)): "
         "adapter hidden size 8 -> 32 and lr 1e-3 -> 3e-3 help most (`--recipe tuned`; not the default: it "
         "diverged on a small-batch run); scale 5 helps alone but diverges with lr 3e-3; label smoothing 0.1 and "
         "hidden 64 do not help; letting BatchNorm statistics adapt (exactly foldable, as a per-channel affine of "
         "every conv's output, but not as a low-rank delta) lost 4 points on Fashion-MNIST; 20 epochs add 1 point "
         "but double the training; mixup, augmentation and a `conv_head` site were not tried.")

PAPER = ("The paper's figures for reference (ViT-B/16, VTAB-1k, GPU): RepAdapter 76.1 mean of groups vs full "
         "tuning 69.0, with ~25% less training time and ~20% less memory than full tuning. Its savings come from "
         "not computing or storing weight gradients and optimizer state for 86M parameters; the embedded "
         "MobileNetV2 has 2.2M, so there those are a few MiB, while every method except the linear probe still "
         "back-propagates through the whole network (the first adapter sits in the first block), and "
         "activations dominate time and memory: the ViT rows show where the savings do appear.")


def _timing_noise(rows: list[dict[str, Any]]) -> str:
    """One configuration's time per epoch across datasets and seeds: the same computation (image count and size
    are equal), so its spread is the run-to-run noise that a time ratio between two runs carries."""
    by_config: dict[str, list[float]] = {}
    for r in rows:
        by_config.setdefault(r["config"], []).append(r["seconds_per_epoch"])
    spreads = {c: max(v) / min(v) for c, v in by_config.items() if len(v) > 1 and c != "linear"}
    if not spreads:
        return "Each configuration ran once: time ratios carry the run-to-run noise of one run."
    text = ", ".join(f"{c} x{s:.2f}" for c, s in spreads.items())
    return (f"The same configuration does the same work in every run (same image count and size), so its max/min "
            f"time per epoch over datasets and seeds is the run-to-run noise: {text}. Time ratios closer to 1 than "
            f"that are not a measured difference.")


def plot(payload: dict[str, Any], path: Path) -> None:
    """Test accuracy per dataset and configuration (bars, seeds' range as error bars) and the ViT step split."""
    summary = payload["results"]["summary"]
    configs = list(summary["overall"])
    datasets = list(dict.fromkeys(c["dataset"] for c in summary["cells"]))
    at = {(c["dataset"], c["config"]): c["test_accuracy"] for c in summary["cells"]}
    vit = payload["results"].get("vit") or []
    fig, axes = plots.subplots(2 if vit else 1, 1, width=6.0)
    ax = axes[0][0]
    width = 0.8 / len(configs)
    for k, config in enumerate(configs):
        xs = [i + k * width for i in range(len(datasets))]
        cells = [at[d, config] for d in datasets]
        means = [100 * c["mean"] for c in cells]
        err = [[m - 100 * c["min"] for m, c in zip(means, cells, strict=True)],
               [100 * c["max"] - m for m, c in zip(means, cells, strict=True)]]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=config)
    ax.set_xticks([i + width * (len(configs) - 1) / 2 for i in range(len(datasets))], datasets)
    low = min(100 * at[k]["min"] for k in at)
    ax.set(ylabel="test accuracy % (seeds' range)", ylim=(max(0.0, low - 5), 100))
    ax.legend(fontsize=7, ncol=2)
    if vit:
        _plot_vit(axes[0][1], vit)
    plots.save_figure(fig, path)


def _plot_vit(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Stacked forward / backward / optimizer time per method."""
    bottom = [0.0] * len(rows)
    for phase in ("forward", "backward", "optimizer"):
        values = [1e3 * r["seconds"][phase] for r in rows]
        ax.bar([r["method"] for r in rows], values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(ylabel=f"ms per step ({rows[0]['arch']})")
    ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
