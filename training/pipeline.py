"""One training run end to end: data, backbone, trial(s), proof of the served bundle, publication, report.

Only the main process evaluates at the end, writes the bundle and the report; every process trains.
Nothing reaches the store before the very end (a store's ``put`` is atomic), so an interruption at any
point leaves no half task behind: only the last per-epoch checkpoint, which ``--resume`` continues.
Whatever would refuse the bundle at the end (an existing task, an unreachable service, a refused token)
is checked before the first epoch; a publication that still fails raises :class:`PublishError` with the
``--resume`` command that publishes the finished checkpoint without training again.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from repadapter import Backbone, PreprocessConfig, Site, TaskBundle, attach_slots, build_transform
from repadapter.errors import RepServeError, TaskExists

from .batches import Transformed, eval_loader, extract_features
from .checkpoint import CHECKPOINT_FILE
from .config import TrainConfig
from .data import load_dataset
from .device import DeviceContext, device_context
from .export import (
    Agreement,
    PublishError,
    as_served,
    build_bundle,
    check_registration,
    ensure_absent,
    publish,
    served_logits,
)
from .model import TaskModel, build_model, load_task_backbone, trainable_parameters
from .report import (
    CONFUSION_FILE,
    PLOT_FILE,
    REPORT_FILE,
    class_figures,
    class_table,
    plot_confusion,
    plot_curves,
    write_json,
)
from .trainer import EpochStats, Trainer, TrialResult, loss_and_accuracy, predict

log = logging.getLogger(__name__)

EpochHook = Callable[[EpochStats], None]


def trial_dir(cfg: TrainConfig, scale: float) -> Path:
    """Where one trial checkpoints: the run directory, or one sub-directory per scale when searching."""
    return cfg.run_dir / f"scale-{scale:g}" if cfg.search_scale else cfg.run_dir


def preflight(cfg: TrainConfig) -> None:
    """Fail before training, not after it, when the store or the service would refuse the bundle."""
    if cfg.method == "full":
        if cfg.register_url:
            log.warning("full fine-tuning reports figures only: nothing is registered")
        return
    if cfg.register_url:
        check_registration(cfg.register_url, cfg.token, cfg.task, overwrite=cfg.overwrite)
    else:
        ensure_absent(cfg.store, cfg.task, overwrite=cfg.overwrite)


def _preflight_everywhere(cfg: TrainConfig, rt: DeviceContext) -> None:
    """:func:`preflight` on the main process; under torchrun every process stops when it fails."""
    error: Exception | None = None
    if rt.is_main:
        try:
            preflight(cfg)
        except Exception as e:  # re-raised below, after telling the other processes
            error = e
    if rt.max(float(error is not None)):
        raise error if error is not None else ValueError("the main process refused the run (see its log)")


def run(cfg: TrainConfig, *, progress: bool = False, on_epoch_end: EpochHook | None = None) -> dict[str, Any] | None:
    """Train, verify and publish per ``cfg``; returns the report on the main process, ``None`` elsewhere."""
    started = time.perf_counter()
    with device_context(cfg.device, cfg.amp) as rt:
        return _run(cfg, rt, started, progress, on_epoch_end)


@dataclass
class Prepared:
    """Everything the trials share: the backbone (with slots), the task's preprocessing and the splits.

    ``images`` are the preprocessed splits (``train``, ``val`` and, when non-empty, ``test``);
    ``train_set``/``val_set`` are what the model consumes: the images, or cached features for ``linear``.
    """

    backbone: Backbone
    sites: list[Site]
    preprocess: PreprocessConfig
    classes: list[str]
    images: dict[str, Dataset]
    train_set: Dataset
    val_set: Dataset
    workers: int
    feature_seconds: float | None = None


def prepare(cfg: TrainConfig, rt: DeviceContext, progress: bool = False) -> Prepared:
    splits = load_dataset(cfg.data, seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                          class_mix=cfg.class_mix)
    backbone = load_task_backbone(cfg, rt.device)
    preprocess = backbone.preprocess.with_size(cfg.image_size) if cfg.image_size else backbone.preprocess
    transform = build_transform(preprocess)  # the service's own preprocessing: no train/serve skew
    images: dict[str, Dataset] = {name: Transformed(ds, transform)
                                  for name, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test))
                                  if ds is not None and len(ds)}  # type: ignore[arg-type]
    workers = cfg.workers if cfg.workers is not None else (4 if rt.device.type == "cuda" else 0)
    sites = attach_slots(backbone.model, cfg.placement) if cfg.method == "repadapter" else []
    p = Prepared(backbone, sites, preprocess, splits.classes, images, images["train"], images["val"], workers)
    if cfg.method == "linear":
        start = time.perf_counter()
        p.train_set, p.val_set = (extract_features(backbone.model, images[k], cfg.batch_size, rt, workers,
                                                   desc=f"{k} features", progress=progress) for k in ("train", "val"))
        p.feature_seconds = time.perf_counter() - start
    return p


def train_trials(cfg: TrainConfig, rt: DeviceContext, p: Prepared, progress: bool,
                 on_epoch_end: EpochHook | None) -> tuple[TaskModel, list[TrialResult], TrialResult]:
    """Train one trial per scale; returns the best trial's model (reloaded when it was not the last)."""
    trials: list[TrialResult] = []
    for i, scale in enumerate(cfg.scales, 1):
        name = f"trial {i}/{len(cfg.scales)} scale={scale:g} " if cfg.search_scale else ""
        model = build_model(cfg, p.backbone, p.sites, len(p.classes), scale)
        trainer = Trainer(cfg, rt, model, p.train_set, p.val_set, scale, trial_dir(cfg, scale) / CHECKPOINT_FILE,
                          workers=p.workers, progress=progress, on_epoch_end=on_epoch_end, name=name)
        trials.append(trainer.fit())
        if name:
            log.info("%sdone val_accuracy=%.4f seconds=%.1f", name, trials[-1].val_accuracy,
                     trials[-1].train_seconds)
    best = pick_trial(trials, p.classes)
    if best is not trials[-1]:
        log.info("scale search: %s -> scale=%g", {t.scale: round(t.val_accuracy, 4) for t in trials}, best.scale)
        model = build_model(cfg, p.backbone, p.sites, len(p.classes), best.scale)
        model.load_state_dict(best.state, strict=False)
    return model, trials, best


def pick_trial(trials: list[TrialResult], classes: list[str]) -> TrialResult:
    """The trial with the best validation accuracy among those that did not collapse to one class (first of
    equals, in grid order; :attr:`~training.trainer.TrialResult.collapse`: a model that predicts one class
    for nearly every image *and* for nearly every image of the other classes, so a good model of a skewed
    split is not one). A collapsed trial is named in a warning with its figures; when a scale search has
    nothing else, it fails (a lone run is kept, with the warning)."""
    healthy = []
    for t in trials:
        if t.collapse is None:
            healthy.append(t)
            continue
        top, share = t.collapse
        total = sum(t.val_predicted)
        truth = t.val_true[top] / total if top < len(t.val_true) else float("nan")
        log.warning("scale=%g collapsed: it predicts %r for %.1f%% of the %d validation images (%.1f%% of them are "
                    "%r) and for %.1f%% of the others, val_accuracy=%.4f%s", t.scale, classes[top], 100 * share,
                    total, 100 * truth, classes[top], 100 * (t.others_called(top) or 0.0), t.val_accuracy,
                    "; never picked" if len(trials) > 1 else "")
    if healthy:
        return max(healthy, key=lambda t: t.val_accuracy)
    if len(trials) > 1:
        raise ValueError(f"every --search-scale trial ({', '.join(f'{t.scale:g}' for t in trials)}) collapsed to "
                         "predicting one class: try a lower --lr, --balance loss or sampler, or other --scale-grid "
                         "values")
    return trials[0]


def final_evaluation(cfg: TrainConfig, p: Prepared, model: TaskModel, scale: float,
                     progress: bool = False) -> tuple[dict[str, Any], dict[str, Any], TaskBundle | None]:
    """Validation and test figures of the final model (``metrics``, and per split the per-class figures of
    :func:`~training.report.class_figures`) and, for servable methods, its verified bundle.

    Runs in fp32 on this process only (no collective may run here: other ranks may have finished).
    """
    local = DeviceContext(next(model.parameters()).device)

    def loader(ds: Dataset) -> DataLoader:
        return eval_loader(ds, cfg.batch_size, local, p.workers, shard=False)

    model.eval()
    trained, labels = predict(model, loader(p.val_set), local, "validation (trained model)", progress=progress)
    val_loss, val_acc = loss_and_accuracy(trained, labels, local)
    evaluation = {"val": class_figures(labels, trained.argmax(1), p.classes)}
    metrics: dict[str, Any] = {"val_accuracy": val_acc, "val_macro_accuracy": evaluation["val"]["macro_accuracy"],
                               "val_loss": val_loss}
    bundle = None
    if cfg.method != "full":
        bundle = as_served(build_bundle(cfg, model, p.sites, p.backbone, p.classes, p.preprocess, scale),
                           p.backbone, p.sites)
        served = served_logits(bundle, p.backbone, p.sites, loader(p.images["val"]), local,
                               "validation (served bundle)", progress=progress)[0]
        agreement = Agreement.of(trained, served)
        metrics |= {"merged_argmax_agreement": agreement.argmax_agreement,
                    "merged_max_abs_logit_diff": agreement.max_abs_logit_diff}
    if "test" in p.images:
        test = loader(p.images["test"])
        logits, labels = (served_logits(bundle, p.backbone, p.sites, test, local, "test (served bundle)",
                                        progress=progress) if bundle is not None
                          else predict(model, test, local, "test", progress=progress))
        evaluation["test"] = class_figures(labels, logits.argmax(1), p.classes)
        metrics |= {"test_accuracy": evaluation["test"]["accuracy"],
                    "test_macro_accuracy": evaluation["test"]["macro_accuracy"]}
    return metrics, evaluation, bundle


def _run(cfg: TrainConfig, rt: DeviceContext, started: float, progress: bool,
         on_epoch_end: EpochHook | None) -> dict[str, Any] | None:
    _preflight_everywhere(cfg, rt)
    p = prepare(cfg, rt, progress)
    rt.reset_peak_memory()
    model, trials, best = train_trials(cfg, rt, p, progress, on_epoch_end)
    peak_mib, peak_kind = rt.peak_memory()
    peak_mib = rt.max(peak_mib)  # the last collective: from here on, the main process only
    if not rt.is_main:
        return None
    metrics, evaluation, bundle = final_evaluation(cfg, p, model, best.scale, progress)
    history = [asdict(h) for h in best.history]
    search = [{"scale": t.scale, "val_accuracy": t.val_accuracy, "train_seconds": round(t.train_seconds, 3),
               "collapsed": t.collapse is not None} for t in trials]
    metrics |= {
        "trainable_params": trainable_parameters(model), "epochs": len(history), "steps": best.steps,
        "train_seconds": round(best.train_seconds, 3),
        "seconds_per_epoch": round(statistics.fmean(h["seconds"] for h in history), 3),
        "peak_memory_mib": round(max(peak_mib, rt.peak_memory()[0]), 1), "peak_memory_kind": peak_kind,
        "scale": best.scale, "balance": cfg.balance, "n_train": len(p.images["train"]),  # type: ignore[arg-type]
        "n_val": len(p.images["val"]),  # type: ignore[arg-type]
        "n_test": len(p.images["test"]) if "test" in p.images else 0,  # type: ignore[arg-type]
        "data": cfg.data, "image_size": p.preprocess.image_size[0], "world_size": rt.world_size,
        "device": rt.device.type, "amp": rt.amp_name,
    }
    if p.feature_seconds is not None:
        metrics["feature_seconds"] = round(p.feature_seconds, 3)
    if cfg.search_scale:
        metrics["scale_search"] = search
    log.info("task=%s method=%s val_accuracy=%.4f val_macro_accuracy=%.4f test_accuracy=%s test_macro_accuracy=%s "
             "agreement=%s trainable_params=%d", cfg.task, cfg.method, metrics["val_accuracy"],
             metrics["val_macro_accuracy"], metrics.get("test_accuracy"), metrics.get("test_macro_accuracy"),
             metrics.get("merged_argmax_agreement"), metrics["trainable_params"])
    report: dict[str, Any] = {
        "task": cfg.task, "method": cfg.method, "metrics": metrics, "evaluation": evaluation, "history": history,
        "scale_search": search, "backbone": {"arch": p.backbone.arch, "fingerprint": p.backbone.fingerprint},
        "preprocess": p.preprocess.model_dump(mode="json"), "config": cfg.public_dict(), "bundle": None,
        "report": str(cfg.run_dir / REPORT_FILE), "plot": str(cfg.run_dir / PLOT_FILE),
        "confusion_plot": str(cfg.run_dir / CONFUSION_FILE),
    }
    _write_plots(cfg, report, history, search)
    report["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_json(cfg.run_dir / REPORT_FILE, report)  # figures survive a refused publication
    if bundle is not None:
        bundle.manifest = bundle.manifest.model_copy(update={"metrics": metrics})
        report["bundle"] = _publish(cfg, bundle, trial_dir(cfg, best.scale) / CHECKPOINT_FILE)
        write_json(cfg.run_dir / REPORT_FILE, report)
    return report


def _write_plots(cfg: TrainConfig, report: dict[str, Any], history: list[dict[str, Any]],
                 search: list[dict[str, Any]]) -> None:
    """``curves.png``, and ``confusion.png`` of the test split (validation without one), whose per-class
    table also goes to the log."""
    split = "test" if "test" in report["evaluation"] else "val"
    figures = report["evaluation"][split]
    log.info("per-class figures on the %s split (%d images):\n%s", split,
             sum(row["support"] for row in figures["per_class"]), class_table(figures))
    plot_curves(cfg.run_dir / PLOT_FILE, history, f"{cfg.task}: {cfg.method} on {cfg.data}", search)
    plot_confusion(cfg.run_dir / CONFUSION_FILE, figures, f"{cfg.task}: {split} split, rows = true class")


def _publish(cfg: TrainConfig, bundle: TaskBundle, checkpoint: Path) -> dict[str, Any]:
    """Publish the verified bundle; a failure is a :class:`PublishError` saying how to publish it later."""
    try:
        return publish(bundle, store=cfg.store, register_url=cfg.register_url, token=cfg.token,
                       overwrite=cfg.overwrite)
    except (RepServeError, OSError, ValueError) as e:
        exists = isinstance(e, TaskExists)
        command = cfg.command_line(resume=True, overwrite=cfg.overwrite or exists)
        token = " (with the same token: --token, $REPSERVE_TOKEN or $REPSERVE_ADMIN_TOKEN)" if cfg.token else ""
        raise PublishError(f"training succeeded but publishing failed: {e}. The trained model is kept in "
                           f"{checkpoint} and its figures in {cfg.run_dir / REPORT_FILE}; this publishes it "
                           f"without training again{token}:\n  {command}") from e
