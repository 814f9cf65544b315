"""Turn a trained model into a task bundle, prove it serves what was trained, and hand it to the service.

The proof runs the bundle the way the service does: serialized and parsed back (checksums, shapes),
checked against the backbone, its adapters folded into the backbone's weights by
:class:`~repadapter.WeightSwitcher` (no adapter in any slot), and its head applied to the pooled
features. Its validation predictions must equal the training-time (unmerged) model's.
"""

from __future__ import annotations

import email.utils
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
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
from .device import DeviceContext
from .model import TaskModel, adapters_of
from .trainer import predict

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
"""Answers that mean "later" (rate limit, not ready, queue full): retried after the server's Retry-After."""
RETRY_ATTEMPTS = 5
RETRY_WAIT_CAP_S = 30.0
CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Hints:
    """How the caller's user gives the service's URL and admin token, as the registration errors name them
    ("check {url}", "pass {token}"). The defaults are ``python -m training``'s flags; another command line
    that registers through this module passes its own (e.g. ``Hints(url="--url", token="$REPSERVE_TOKEN or
    $REPSERVE_ADMIN_TOKEN")``)."""

    url: str = "--register"
    token: str = "--token, $REPSERVE_TOKEN or $REPSERVE_ADMIN_TOKEN"


TRAINING_HINTS = Hints()


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
                  rt: DeviceContext, desc: str = "served bundle", *, progress: bool = False) -> tuple[Tensor, Tensor]:
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
        return predict(lambda x: F.linear(backbone.model(x), weight, bias), loader, rt, desc, progress=progress)
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
            overwrite: bool = False, hints: Hints = TRAINING_HINTS) -> dict[str, Any]:
    """Write the bundle into ``store`` (atomic) or POST it to ``register_url``; returns where it went.
    ``hints``: how the caller's user gives the URL and token (named in registration errors)."""
    if register_url:
        stored = register(bundle, register_url, token, overwrite=overwrite, hints=hints)
        return {"registered": register_url, "name": stored.get("name", bundle.name), "version": stored.get("version")}
    manifest = open_store(store).put(bundle, overwrite=overwrite)
    return {"store": str(store), "name": manifest.name, "version": manifest.version}


def _retry_after(response: httpx.Response) -> float:
    """Seconds to wait per the ``Retry-After`` header (delta-seconds or an HTTP date; 1 s when absent),
    capped at :data:`RETRY_WAIT_CAP_S`."""
    value = response.headers.get("Retry-After", "1").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            seconds = 1.0
    return min(max(seconds, 0.0), RETRY_WAIT_CAP_S)


def request(method: str, url: str, token: str | None, *, timeout_s: float = CHECK_TIMEOUT_S,
            hints: Hints = TRAINING_HINTS, **kwargs: object) -> httpx.Response:
    """One HTTP request to the service, retried on 429/503 after their ``Retry-After`` (at most
    :data:`RETRY_ATTEMPTS` tries); an unreachable server is a :class:`RegisterError` naming ``hints.url``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    attempt = 1
    while True:
        try:
            response = httpx.request(method, url, headers=headers, timeout=timeout_s, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as e:
            raise RegisterError(f"cannot reach the service at {url} ({type(e).__name__}: {e}): check {hints.url} "
                                "and that the server is running") from e
        if response.status_code not in RETRY_STATUSES or attempt == RETRY_ATTEMPTS:
            return response
        wait = _retry_after(response)
        log.warning("%s %s answered %d (%s): retry %d/%d in %.1f s", method, url, response.status_code,
                    _detail(response), attempt, RETRY_ATTEMPTS - 1, wait)
        time.sleep(wait)
        attempt += 1


def _detail(response: httpx.Response) -> str:
    """The service's error message (``{"error", "detail"}`` body), or the start of any other body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)[:300]


def _base(url: str) -> str:
    """The service's base URL (a ``--register`` URL may end in ``/tasks``)."""
    return url.rstrip("/").removesuffix("/tasks")


def check_registration(url: str, token: str | None, task: str, *, overwrite: bool,
                       hints: Hints = TRAINING_HINTS) -> None:
    """Before any training: the service answers, accepts the token for registration, and ``task`` is free
    (or ``overwrite``). Each failure is a :class:`RegisterError` (or :class:`TaskExists`) naming the flag
    (``hints``: how the caller's user gives the URL and token).

    The token is tried on ``POST /tasks`` without a body: the admin check runs before the body is read, so
    an accepted token gets 422 (no bundle) and nothing is written; a missing one 401, a wrong one 403.
    """
    base = _base(url)
    health = request("GET", f"{base}/healthz", token, hints=hints)
    if health.status_code != 200:
        raise RegisterError(f"the service at {base} is not healthy: GET /healthz answered {health.status_code} "
                            f"({_detail(health)}); check {hints.url}")
    _check_token(base, token, hints)
    existing = request("GET", f"{base}/tasks/{task}", token, hints=hints)
    if existing.status_code == 200 and not overwrite:
        raise TaskExists(f"task {task!r} is already registered at {base} (version "
                         f"{existing.json().get('version')}): pass --overwrite to publish the new one as its next "
                         "version, or choose another --task")
    if existing.status_code not in (200, 404):
        raise RegisterError(f"{base} answered {existing.status_code} for GET /tasks/{task} ({_detail(existing)})")
    log.info("registration checked url=%s task=%s exists=%s", base, task, existing.status_code == 200)


def _check_auth(base: str, response: httpx.Response, hints: Hints) -> None:
    """401/403 from a management route: the admin token is missing or wrong."""
    if response.status_code == 401:
        raise RegisterError(f"{base} needs an admin token to register tasks: pass {hints.token}")
    if response.status_code == 403:
        raise RegisterError(f"{base} refused the admin token ({_detail(response)}): check {hints.token}")


def _check_token(base: str, token: str | None, hints: Hints) -> None:
    """``POST /tasks`` without a body: 422 (no bundle) once the admin check has passed; nothing is written."""
    probe = request("POST", f"{base}/tasks", token, hints=hints)
    _check_auth(base, probe, hints)
    if probe.status_code in RETRY_STATUSES:
        raise RegisterError(f"the service at {base} is not ready after {RETRY_ATTEMPTS} tries ({_detail(probe)}): "
                            "start training when GET /readyz answers 200")
    if probe.status_code not in (415, 422):
        raise RegisterError(f"{base} does not look like a RepServe service: POST /tasks answered "
                            f"{probe.status_code} ({_detail(probe)}); check {hints.url}")


def register(bundle: TaskBundle, url: str, token: str | None, *, overwrite: bool = False,
             timeout_s: float = 60.0, hints: Hints = TRAINING_HINTS) -> dict[str, Any]:
    """``POST {url}/tasks`` (multipart ``manifest`` + ``tensors``); returns the stored manifest (JSON).

    ``url`` is the service's base URL (a URL already ending in ``/tasks`` is used as is). 409 raises
    :class:`TaskExists` (naming ``--overwrite``), any other status but 201 :class:`RegisterError` (naming
    ``hints``: how the caller's user gives the URL and token; the defaults are ``python -m training``'s).
    """
    endpoint = f"{_base(url)}/tasks"
    manifest_bytes, tensor_bytes = bundle.serialize()
    files = {"manifest": ("manifest.json", manifest_bytes, "application/json"),
             "tensors": ("adapter.safetensors", tensor_bytes, "application/octet-stream")}
    response = request("POST", endpoint, token, timeout_s=timeout_s, hints=hints, files=files,
                       params={"overwrite": str(overwrite).lower()})
    if response.status_code == 409:
        raise TaskExists(f"task {bundle.name!r} is already registered at {endpoint} ({_detail(response)}): pass "
                         "--overwrite to publish it as its next version")
    _check_auth(_base(url), response, hints)
    if response.status_code != 201:
        raise RegisterError(f"{endpoint} answered {response.status_code}: {_detail(response)}")
    log.info("registered task=%s at %s", bundle.name, endpoint)
    return response.json()
