"""Helpers shared by the service tests (unit and integration): real bundles and offline references.

Bundles are built with the real core (random but non-trivial adapters, a seeded head, the backbone's
fingerprint); references are *offline merged predictions*: an independent backbone instance, the task
merged with its own :class:`WeightSwitcher`, the head, float32 softmax, top-k.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from repadapter import (
    AdapterConfig,
    Backbone,
    BackboneRef,
    LocalStore,
    Manifest,
    TaskBundle,
    WeightSwitcher,
    attach_slots,
    load_backbone,
)
from repadapter.inject import Site
from repadapter.preprocess import preprocess_batch
from service.lifecycle import Runtime
from service.metrics import Metrics
from service.settings import Settings
from tests.conftest import random_adapters

TINY_ARCH = "vit_tiny_patch16_224"
TINY_OPTIONS: dict[str, Any] = {"img_size": 64, "depth": 3}
SCORE_TOL = 1e-4

Predictions = list[list[tuple[str, float]]]


@dataclass
class Model:
    """An offline copy of the serving backbone: builds bundles for it and computes reference answers."""

    backbone: Backbone
    sites: list[Site]
    switcher: WeightSwitcher

    @classmethod
    def load(cls, arch: str = TINY_ARCH, **options: Any) -> Model:
        backbone = load_backbone(arch, **options)
        sites = attach_slots(backbone.model, "block")
        return cls(backbone, sites, WeightSwitcher(sites))

    def bundle(self, name: str, seed: int, *, classes: int = 5, adapters: bool = True, size: int | None = None,
               std: float = 0.1) -> TaskBundle:
        """A task for this backbone: labels ``<name>-<i>``, seeded adapters (or none) and head."""
        g = torch.Generator().manual_seed(10_000 + seed)
        f = self.backbone.num_features
        preprocess = self.backbone.preprocess if size is None else self.backbone.preprocess.with_size(size)
        manifest = Manifest(
            name=name, labels=[f"{name}-{i}" for i in range(classes)],
            method="repadapter" if adapters else "linear",
            adapter=AdapterConfig(hidden=8 if adapters else 0, groups=2, scale=1.0),
            backbone=BackboneRef(arch=self.backbone.arch, fingerprint=self.backbone.fingerprint),
            preprocess=preprocess,
        )
        weights = random_adapters(self.sites, seed, std=std) if adapters else {}
        head_w = torch.randn(classes, f, generator=g) * (3.0 / f**0.5)
        head_b = torch.randn(classes, generator=g) * 0.1
        return TaskBundle(manifest, weights, head_w, head_b)

    @torch.no_grad()
    def predict(self, bundle: TaskBundle, images: list[bytes], top_k: int = 5) -> Predictions:
        """Offline merged predictions of ``bundle`` for encoded ``images``."""
        x = preprocess_batch(images, bundle.manifest.preprocess)  # the service's decode and preprocessing
        delta = self.switcher.prepare(bundle.name, bundle.adapters) if bundle.adapters else None
        self.switcher.activate(delta)
        try:
            feats = self.backbone.model(x)
        finally:
            self.switcher.activate(None)
        probs = (feats @ bundle.head_weight.t() + bundle.head_bias).float().softmax(-1)
        scores, index = probs.topk(min(top_k, len(bundle.manifest.labels)), dim=-1)
        labels = bundle.manifest.labels
        return [[(labels[i], s) for i, s in zip(ri, rs, strict=True)]
                for ri, rs in zip(index.tolist(), scores.tolist(), strict=True)]


def encode(image: Image.Image, fmt: str = "PNG", size: tuple[int, int] | None = None) -> bytes:
    if size is not None:
        image = image.resize(size)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def answers(body: dict) -> Predictions:
    """The ``[(label, score), ...]`` per image of a /classify response body."""
    return [[(p["label"], p["score"]) for p in r["predictions"]] for r in body["results"]]


def assert_predictions(got: Predictions, expected: Predictions, tol: float = SCORE_TOL) -> None:
    """Same labels in the same order, scores within ``tol`` (batch composition changes rounding only)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert [label for label, _ in g] == [label for label, _ in e]
        for (_, gs), (_, es) in zip(g, e, strict=True):
            assert abs(gs - es) <= tol, (g, e)


def bundle_parts(bundle: TaskBundle) -> dict[str, bytes]:
    manifest, tensors = bundle.serialize()
    return {"manifest.json": manifest, "adapter.safetensors": tensors}


def multipart_bundle(bundle: TaskBundle) -> list[tuple[str, tuple[str, bytes, str]]]:
    """``files=`` for POST /tasks with separate manifest and tensors."""
    parts = bundle_parts(bundle)
    return [("manifest", ("manifest.json", parts["manifest.json"], "application/json")),
            ("tensors", ("adapter.safetensors", parts["adapter.safetensors"], "application/octet-stream"))]


def archive(files: dict[str, bytes], kind: str = "zip", prefix: str = "") -> bytes:
    """A bundle archive (``zip``, ``tar``, ``tar.gz``) holding ``files`` under ``prefix``."""
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(prefix + name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz" if kind == "tar.gz" else "w") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(prefix + name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """One torch thread for the block: on a small shared machine spinning OpenMP threads make every op
    tens of times slower. Restores the previous count (the setting is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stored(root: Path, bundles: Iterable[TaskBundle]) -> LocalStore:
    """A store at ``root`` holding ``bundles`` (version 1 each)."""
    store = LocalStore(root)
    for bundle in bundles:
        store.put(bundle)
    return store


@contextlib.contextmanager
def runtimes(store: Path, **defaults: object) -> Iterator[Callable[..., Runtime]]:
    """Factory of started, ready runtimes on the tiny ViT over ``store`` (settings: the tiny backbone, no store
    polling, ``defaults``, then the call's own); every one is closed at the end."""
    started: list[Runtime] = []

    def make(**overrides: object) -> Runtime:
        settings = Settings(**{"backbone": TINY_ARCH, "backbone_options": TINY_OPTIONS, "store": store,
                               "store_poll_s": 0, **defaults, **overrides})
        runtime = Runtime(settings, Metrics())
        started.append(runtime)
        runtime.initialize()
        assert runtime.ready.is_set(), runtime.failure
        return runtime

    try:
        yield make
    finally:
        for runtime in started:
            runtime.close()
