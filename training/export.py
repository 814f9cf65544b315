"""Turn a trained model into a task bundle, prove it serves what was trained, and hand it to the service.

The proof runs the bundle the way the service does: serialized and parsed back (checksums, shapes),
checked against the backbone, its adapters folded into the backbone's weights by
:class:`~repadapter.WeightSwitcher` (no adapter in any slot), and its head applied to the pooled
features. Its validation predictions must equal the training-time (unmerged) model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from repadapter import (
    AdapterConfig,
    Backbone,
    BackboneRef,
    Manifest,
    PreprocessConfig,
    Site,
    TaskBundle,
    WeightSwitcher,
)
from repadapter.errors import RepServeError, TaskExists
from repadapter.store import open_store

from .config import TrainConfig
from .model import TaskModel, adapters_of
from .device import DeviceContext
from .trainer import predict

log = logging.getLogger(__name__)


class RegisterError(RepServeError):
    """The service refused or could not receive a bundle posted by ``--register``."""

    code = "register_failed"


class PublishError(RepServeError):
    """Training succeeded but its bundle could not be published; the message says where the result is kept
    and how to publish it without training again (``--resume --register ...``)."""

    code = "publish_failed"


def build_bundle(cfg: TrainConfig, model: TaskModel, sites: list[Site], backbone: Backbone, labels: list[str],
                 preprocess: PreprocessConfig, scale: float) -> TaskBundle:
    """The bundle of a trained ``repadapter`` or ``linear`` model (adapters from the slots, fp32 head)."""
    adapters = {name: a.weights() for name, a in adapters_of(sites).items()}
    hidden = cfg.hidden if adapters else 0
    manifest = Manifest(
        name=cfg.task, labels=labels, method=cfg.method,
        adapter=AdapterConfig(hidden=hidden, groups=cfg.groups, scale=scale, placement=cfg.placement,
                              dropout=cfg.dropout),
        backbone=BackboneRef(arch=backbone.arch, fingerprint=backbone.fingerprint), preprocess=preprocess,
        description=f"{cfg.method} on {cfg.data} ({len(labels)} classes)",
    )
    head = model.head
    return TaskBundle(manifest, adapters, head.weight.detach().float().cpu(), head.bias.detach().float().cpu())


def as_served(bundle: TaskBundle, backbone: Backbone, sites: list[Site]) -> TaskBundle:
    """The bundle after the trip through bytes the service makes, refused as the service would refuse it."""
    parsed = TaskBundle.deserialize(*bundle.serialize())
    parsed.check_compatible(backbone.arch, backbone.fingerprint, sites, backbone.num_features)
    return parsed


@torch.no_grad()
def served_logits(bundle: TaskBundle, backbone: Backbone, sites: list[Site], loader: DataLoader,
                  rt: DeviceContext) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` and labels of ``bundle`` served merged: adapters folded into the weights.

    The slots are emptied for the duration and the base weights restored bitwise afterwards.
    """
    held = {s.name: s.slot.adapter for s in sites}
    for s in sites:
        s.slot.adapter = None
    switcher = WeightSwitcher(sites)
    weight, bias = bundle.head_weight.to(rt.device), bundle.head_bias.to(rt.device)
    backbone.model.eval()
    try:
        switcher.activate(switcher.prepare(bundle.name, bundle.adapters) if bundle.adapters else None)
        return predict(lambda x: F.linear(backbone.model(x), weight, bias), loader, rt)
    finally:
        switcher.activate(None)
        for s in sites:
            s.slot.adapter = held[s.name]


@dataclass
class Agreement:
    """How the served bundle's predictions compare with the training-time model's."""

    argmax_agreement: float
    max_abs_logit_diff: float

    @classmethod
    def of(cls, trained: Tensor, served: Tensor) -> Agreement:
        return cls((trained.argmax(1) == served.argmax(1)).float().mean().item(),
                   (trained - served).abs().max().item())


def ensure_absent(store: str | Path, task: str, *, overwrite: bool) -> None:
    """Refuse early (before any training) a task the store would refuse at the end."""
    versions = [] if overwrite else open_store(store).versions(task)
    if versions:
        raise TaskExists(f"task {task!r} exists in {store} (version {versions[-1]}): pass --overwrite to store "
                         "the new one as its next version")


def publish(bundle: TaskBundle, *, store: str | Path, register_url: str | None = None, token: str | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Write the bundle into ``store`` (atomic) or POST it to ``register_url``; returns where it went."""
    if register_url:
        stored = register(bundle, register_url, token, overwrite=overwrite)
        return {"registered": register_url, "name": stored.get("name", bundle.name), "version": stored.get("version")}
    manifest = open_store(store).put(bundle, overwrite=overwrite)
    return {"store": str(store), "name": manifest.name, "version": manifest.version}


def register(bundle: TaskBundle, url: str, token: str | None, *, overwrite: bool = False,
             timeout_s: float = 60.0) -> dict[str, Any]:
    """``POST {url}/tasks`` (multipart ``manifest`` + ``tensors``); returns the stored manifest (JSON).

    ``url`` is the service's base URL (a URL already ending in ``/tasks`` is used as is). Any status but
    201 raises :class:`RegisterError` with the service's error body.
    """
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/tasks"):
        endpoint += "/tasks"
    manifest_bytes, tensor_bytes = bundle.serialize()
    files = {"manifest": ("manifest.json", manifest_bytes, "application/json"),
             "tensors": ("adapter.safetensors", tensor_bytes, "application/octet-stream")}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(endpoint, files=files, params={"overwrite": str(overwrite).lower()},
                              headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise RegisterError(f"cannot reach {endpoint}: {e}") from e
    if response.status_code != 201:
        raise RegisterError(f"{endpoint} answered {response.status_code}: {response.text[:500]}")
    log.info("registered task=%s at %s", bundle.name, endpoint)
    return response.json()
