"""Task stores for the serving benchmarks: N tasks in seconds, and each task's full fine-tuned model.

Writing 10,000 real bundles through the store (checksums, fsyncs, a catalog rewrite each) would take longer
than the benchmark, so ``distinct`` bundles (random non-trivial adapters on every site, seeded 10-class
heads) are written through :meth:`LocalStore.put`, and every other task is a copy of one of them under a
new name: its own manifest (name, labels) beside a hard link to that bundle's tensor file (so the sha256
still holds), then one :meth:`LocalStore.reindex`. Every task answers with its own labels. The baseline's
per-task model files (:func:`export_models`) are hard links the same way. So both servers read a few
distinct files from a warm page cache: this flatters the baseline most, whose 10,000 real full-model
files (9.6 MiB each for the embedded MobileNetV2, 330 MiB for a ViT-B) would not fit in it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from repadapter import AdapterConfig, BackboneRef, LocalStore, Manifest, TaskBundle, WeightSwitcher, attach_slots
from repadapter.bundle import MANIFEST_FILE, TENSORS_FILE

from . import backbones

HEAD_CLASSES = 10
CONV_IMAGE_SIZE = 96
"""Input size of the embedded (convolutional) backbone's tasks: 5x fewer pixels than 224 keeps CPU loads
short; other backbones keep their own size (a ViT's position embedding is fixed)."""
MODEL_SUFFIX = ".safetensors"


def task_name(i: int) -> str:
    return f"task{i:05d}"


def default_image_size(arch: str) -> int | None:
    return CONV_IMAGE_SIZE if arch == "embedded" else None


def build_store(root: Path, arch: str, *, tasks: int, distinct: int, image_size: int | None,
                seed: int) -> dict[str, Any]:
    """``tasks`` tasks for ``arch`` in a :class:`LocalStore` at ``root`` (``distinct`` real bundles, the rest
    copies under new names, see the module docstring); returns facts for the result."""
    bb = backbones.load(arch, torch.device("cpu"), torch.float32, seed)
    sites = attach_slots(bb.model)
    preprocess = bb.preprocess if image_size is None else bb.preprocess.with_size(image_size)
    store = LocalStore(root)
    g = torch.Generator().manual_seed(seed)
    f = bb.num_features
    distinct = max(1, min(distinct, tasks))
    for i in range(distinct):
        name = task_name(i)
        manifest = Manifest(name=name, labels=_labels(name), adapter=AdapterConfig(hidden=8, groups=2, scale=1.0),
                            preprocess=preprocess, backbone=BackboneRef(arch=bb.arch, fingerprint=bb.fingerprint))
        store.put(TaskBundle(manifest, backbones.random_adapters(sites, seed + 1 + i),
                             torch.randn(HEAD_CLASSES, f, generator=g) * (3.0 / f**0.5),
                             torch.randn(HEAD_CLASSES, generator=g) * 0.1))
    for i in range(distinct, tasks):
        name = task_name(i)
        src, dst = root / task_name(i % distinct) / "v000001", root / name / "v000001"
        dst.mkdir(parents=True)
        os.link(src / TENSORS_FILE, dst / TENSORS_FILE)
        manifest = json.loads((src / MANIFEST_FILE).read_bytes())
        (dst / MANIFEST_FILE).write_text(json.dumps({**manifest, "name": name, "labels": _labels(name)}))
    store.reindex()
    bundle_bytes = (root / task_name(0) / "v000001" / TENSORS_FILE).stat().st_size
    return {"backbone": bb.arch, "sites": len(sites), "input_size": list(preprocess.input_size),
            "params": sum(p.numel() for p in bb.model.parameters()), "distinct_bundles": distinct,
            "bundle_bytes": bundle_bytes}


def _labels(name: str) -> list[str]:
    return [f"{name}-c{c}" for c in range(HEAD_CLASSES)]


def export_models(store_root: Path, out: Path, arch: str, *, seed: int) -> dict[str, Any]:
    """Every task's full fine-tuned model as ``out/<task>.safetensors``: the backbone's state dict with the
    task folded in (by :class:`WeightSwitcher`, exactly what RepServe's merged path computes) and its head
    as ``head.weight``/``head.bias``. Tasks with the same tensors share one file (hard links)."""
    bb = backbones.load(arch, torch.device("cpu"), torch.float32, seed)
    scratch = copy.deepcopy(bb.model)
    switcher = WeightSwitcher(attach_slots(scratch, "block"))
    store = LocalStore(store_root)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for entry in store.list():
        sha = store.manifest(entry.name, entry.version).tensors_sha256
        path = out / f"{entry.name}{MODEL_SUFFIX}"
        if sha in files:
            os.link(files[sha], path)
            continue
        bundle = store.get(entry.name, entry.version)
        with torch.no_grad():
            switcher.activate(switcher.prepare(bundle.name, bundle.adapters) if bundle.adapters else None)
        state = {k: v.detach().contiguous().clone() for k, v in scratch.state_dict().items()}
        state["head.weight"], state["head.bias"] = bundle.head_weight.contiguous(), bundle.head_bias.contiguous()
        save_file(state, str(path))
        files[sha] = path
    first = next(iter(files.values()))
    return {"model_file_bytes": first.stat().st_size, "distinct_models": len(files),
            "model_bytes": backbones.model_nbytes(bb.model)}
