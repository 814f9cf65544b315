"""The demo tasks shipped in adapters_store/: servable on the embedded backbone, with their recorded figures.

Each trained task is re-served here the way the service runs it (bundle from the store, adapters merged
into a fresh backbone, the manifest's preprocessing) on its recorded validation split, and must reproduce
the validation accuracy its training run recorded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from repadapter import LocalStore, TaskBundle, WeightSwitcher, attach_slots, load_backbone
from repadapter.preprocess import preprocess_batch
from training.config import RECIPES
from training.data import load_dataset

STORE = Path(__file__).resolve().parents[2] / "adapters_store"
pytestmark = pytest.mark.skipif(not STORE.is_dir(), reason="adapters_store/ is not built (python -m training --demo)")


def load(task: str) -> TaskBundle:
    return LocalStore(STORE).get(task)  # verifies the sha256 of the tensors


def test_shipped_tasks_are_the_three_demo_tasks():
    assert [e.name for e in LocalStore(STORE).list()] == ["digits", "fashion", "imagenet"]


def test_imagenet_task_is_the_backbone_classifier(embedded, photos):
    bundle = load("imagenet")
    bundle.check_compatible(embedded.arch, embedded.fingerprint, [], embedded.num_features)
    assert (bundle.manifest.method, bundle.adapters, len(bundle.manifest.labels)) == ("pretrained", {}, 1000)
    torch.testing.assert_close(bundle.head_weight, embedded.classifier[0], rtol=0, atol=0)
    with torch.no_grad():
        logits = F.linear(embedded.model(preprocess_batch(photos[:1], bundle.manifest.preprocess)),
                          bundle.head_weight, bundle.head_bias)
    assert bundle.manifest.labels[logits.argmax().item()] == "Egyptian cat"


@pytest.mark.parametrize(("task", "min_val_accuracy"), [("fashion", 0.8), ("digits", 0.9)])
def test_trained_task_reproduces_its_recorded_accuracy(task, min_val_accuracy):
    bundle = load(task)
    m = bundle.manifest.metrics
    assert bundle.manifest.method == "repadapter"
    assert bundle.manifest.adapter.hidden == RECIPES["tuned"]["hidden"]  # built with the demo's recipe
    assert bundle.manifest.preprocess.input_size == (3, 96, 96)
    assert m["merged_argmax_agreement"] == 1.0
    assert m["val_accuracy"] >= min_val_accuracy
    assert (m["n_train"], m["n_val"]) == (800, 200)
    backbone = load_backbone()
    sites = attach_slots(backbone.model)
    bundle.check_compatible(backbone.arch, backbone.fingerprint, sites, backbone.num_features)
    switcher = WeightSwitcher(sites)
    switcher.activate(switcher.prepare(task, bundle.adapters))
    val = load_dataset(m["data"], seed=42, n_train=m["n_train"], n_val=m["n_val"], n_test=m["n_test"]).val
    images, labels = zip(*(val[i] for i in range(len(val))), strict=True)
    with torch.no_grad():
        x = preprocess_batch(list(images), bundle.manifest.preprocess)
        logits = F.linear(backbone.model(x), bundle.head_weight, bundle.head_bias)
    served = (logits.argmax(1) == torch.tensor(labels)).float().mean().item()
    assert abs(served - m["val_accuracy"]) <= 1 / len(val)  # at most one near-tie flips in another batching
