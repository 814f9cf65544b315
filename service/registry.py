"""The task registry: which task versions are served, kept in step with the store.

A :class:`LoadedTask` is immutable and bound to one task version; a request holds a reference to the one
current when it was accepted, so replacing or deleting a task never changes what a queued request is
answered with (it is answered by the version it was accepted for; the response names that version).

Every bundle is validated before anything changes: backbone fingerprint and architecture, adapter sites
and shapes, labels vs head, finite values (also after casting to the serving dtype), the fold into the
base weights (:meth:`WeightSwitcher.prepare`), and that the backbone accepts the task's input size. Only
then is it written to the store (atomically, by :class:`LocalStore`) and published.

Thread-safety: readers (``get``, ``tasks``) see an immutable snapshot dict, replaced wholesale by writers;
writers (``register``, ``delete``, ``sync``) serialise on one lock, so a store scan never interleaves with
a registration. ``prepare`` only reads the switcher's pristine copies, which never change after the
switcher is built, so deltas are computed here, off the worker; activating them stays with the worker.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from repadapter import AdapterWeights, Backbone, LocalStore, Manifest, TaskBundle, TaskDelta
from repadapter.bundle import AdapterConfig, BackboneRef
from repadapter.errors import BundleError, RepServeError, TaskExists, TaskNotFound
from repadapter.inject import Site

from .errors import BuiltinTask
from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_INPUT_SIDE = 4096
"""Largest input height/width a task may declare (a bound on per-image memory)."""

Prepare = Callable[[str, dict[str, AdapterWeights]], TaskDelta]
Probe = Callable[[tuple[int, int, int]], None]


_serials = itertools.count(1)


@dataclass(frozen=True, eq=False)
class LoadedTask:
    """One served task version. ``adapters`` stay float32 (folds are computed from them);
    ``device_adapters`` and the head are on the serving device in the serving dtype.

    ``serial`` is unique per loaded object: a task deleted and registered again restarts at version 1,
    so ``(name, version)`` alone could let queued requests of the old one share weights with the new one.
    """

    manifest: Manifest
    adapters: dict[str, AdapterWeights]
    device_adapters: dict[str, AdapterWeights]
    head_weight: Tensor  # [C, F]
    head_bias: Tensor  # [C]
    builtin: bool = False
    serial: int = field(default_factory=lambda: next(_serials))

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def key(self) -> tuple[str, int, int]:
        """Identity for queues, weight sets and the delta cache."""
        return self.name, self.version, self.serial

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.manifest.preprocess.input_size

    @property
    def weights(self) -> tuple[str, int, int] | None:
        """The weight set a merged forward needs: ``None`` (the base weights) for tasks without adapters."""
        return self.key if self.adapters else None

    @property
    def delta_name(self) -> str:
        return f"{self.name}@v{self.version}"


@dataclass
class SyncReport:
    """What one store scan changed."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class TaskRegistry:
    """Task name -> :class:`LoadedTask`, backed by a :class:`LocalStore`, plus an LRU of task deltas."""

    def __init__(self, store: LocalStore, backbone: Backbone, sites: list[Site], prepare: Prepare, *,
                 metrics: Metrics, delta_cache_size: int = 32, builtin_task: str = "",
                 probe: Probe | None = None) -> None:
        self.store, self.backbone, self.sites = store, backbone, sites
        self._prepare, self._probe, self.metrics = prepare, probe, metrics
        self.device, self.dtype = backbone.device, backbone.dtype
        self._tasks: dict[str, LoadedTask] = {}
        self._write = threading.Lock()
        self._deltas: OrderedDict[tuple[str, int, int], TaskDelta] = OrderedDict()
        self._delta_lock = threading.Lock()
        self.delta_cache_size = delta_cache_size
        self._probed: set[tuple[int, int, int]] = set()
        self._failed: set[tuple[str, int, float]] = set()
        self._builtin = self._builtin_task(builtin_task) if builtin_task else None
        if self._builtin is not None:
            self._tasks = {self._builtin.name: self._builtin}

    def set_probe(self, probe: Probe | None) -> None:
        """Install the engine's input-size probe (the engine is built after the registry)."""
        self._probe = probe

    # ---- reading (any thread) -----------------------------------------------------------------------

    def get(self, name: str) -> LoadedTask:
        task = self._tasks.get(name)
        if task is None:
            raise TaskNotFound(f"no task {name!r}; served tasks: {sorted(self._tasks)[:20]}")
        return task

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def tasks(self) -> list[LoadedTask]:
        return sorted(self._tasks.values(), key=lambda t: t.name)

    def delta(self, task: LoadedTask) -> TaskDelta | None:
        """The task's precomputed fold (``None`` for tasks without adapters), from the LRU or computed."""
        if not task.adapters:
            return None
        with self._delta_lock:
            delta = self._deltas.get(task.key)
            if delta is not None:
                self._deltas.move_to_end(task.key)
                return delta
        delta = self._fold(task.delta_name, task.adapters)
        self._cache(task.key, delta)
        return delta

    def delta_nbytes(self) -> int:
        with self._delta_lock:
            return sum(d.nbytes() for d in self._deltas.values())

    # ---- writing ------------------------------------------------------------------------------------

    def register(self, bundle: TaskBundle, *, overwrite: bool = False) -> LoadedTask:
        """Validate ``bundle``, write it to the store as the task's next version, and serve it at once."""
        delta = self._validate(bundle)
        with self._write:
            current = self._tasks.get(bundle.name)
            if current is not None and not overwrite:
                raise TaskExists(f"task {bundle.name!r} is served (version {current.version}); "
                                 "pass overwrite=true to replace it")
            bundle.manifest = self.store.put(bundle, overwrite=overwrite)
            task = self._materialize(bundle)
            self._publish(task)
        if delta is not None:
            self._cache(task.key, dataclasses.replace(delta, name=task.delta_name))
        log.info("registered task=%s version=%d adapters=%d", task.name, task.version, len(task.adapters))
        return task

    def delete(self, name: str) -> LoadedTask | None:
        """Remove a task from the store and stop serving it; returns the version that was served.

        Requests already accepted keep their :class:`LoadedTask` and are still answered by it.
        """
        with self._write:
            current = self._tasks.get(name)
            if current is not None and current.builtin:
                raise BuiltinTask(f"task {name!r} is the backbone's own classifier, not a stored task")
            try:
                self.store.delete(name)
            except TaskNotFound:
                if current is None:
                    raise
                # already gone from the store (another replica deleted it): stop serving it too
            self._unpublish(name)
        log.info("deleted task=%s version=%s", name, current.version if current else None)
        return current

    def sync(self) -> SyncReport:
        """Re-scan the store: load new or changed versions, drop tasks that disappeared.

        A stored version that fails validation is logged and counted (``repserve_store_errors_total``)
        once, and the previously served version (if any) keeps being served.
        """
        report = SyncReport()
        with self._write:
            try:
                entries = self.store.list()
            except (OSError, RepServeError) as e:
                self.metrics.store_errors.labels(reason="scan").inc()
                log.error("store scan failed store=%s error=%s", self.store.root, e)
                return report
            seen = set()
            for entry in entries:
                seen.add(entry.name)
                current = self._tasks.get(entry.name)
                if current is not None and not current.builtin and current.version == entry.version:
                    continue
                marker = (entry.name, entry.version, entry.mtime)
                if marker in self._failed:
                    continue
                try:
                    bundle = self.store.get(entry.name, entry.version)
                    delta = self._validate(bundle)
                    task = self._materialize(bundle)
                except TaskNotFound:
                    continue  # deleted between listing and reading
                except (OSError, RepServeError) as e:
                    if isinstance(e, RepServeError) and e.status_code < 500:
                        self._failed.add(marker)  # a bad bundle stays bad: not retried every scan (I/O is)
                    reason = e.code if isinstance(e, RepServeError) else "io"
                    self.metrics.store_errors.labels(reason=reason).inc()
                    log.warning("store task rejected task=%s version=%d reason=%s detail=%s",
                                entry.name, entry.version, reason, e)
                    report.failed.append(entry.name)
                    continue
                self._publish(task)
                if delta is not None:
                    self._cache(task.key, dataclasses.replace(delta, name=task.delta_name))
                (report.added if current is None or current.builtin else report.replaced).append(entry.name)
            for name, task in list(self._tasks.items()):
                if not task.builtin and name not in seen:
                    self._unpublish(name)
                    report.removed.append(name)
        self.metrics.store_last_scan.set_to_current_time()
        if report.added or report.replaced or report.removed:
            log.info("store synced added=%s replaced=%s removed=%s failed=%s",
                     report.added, report.replaced, report.removed, report.failed)
        return report

    # ---- internals ----------------------------------------------------------------------------------

    def _builtin_task(self, name: str) -> LoadedTask | None:
        bb = self.backbone
        if bb.classifier is None:
            return None
        weight, bias = bb.classifier
        labels = bb.labels or [f"class_{i}" for i in range(weight.shape[0])]
        manifest = Manifest(
            name=name, version=0, labels=labels, method="pretrained", adapter=AdapterConfig(hidden=0),
            backbone=BackboneRef(arch=bb.arch, fingerprint=bb.fingerprint), preprocess=bb.preprocess,
            description=f"the {bb.arch} backbone's own classifier",
        )
        return self._materialize(TaskBundle(manifest, {}, weight, bias), builtin=True)

    def _validate(self, bundle: TaskBundle) -> TaskDelta | None:
        """Every check a bundle must pass before it changes anything; returns its fold (or ``None``)."""
        bundle.check_compatible(self.backbone.arch, self.backbone.fingerprint, self.sites,
                                self.backbone.num_features)
        c, h, w = bundle.manifest.preprocess.input_size
        if c != 3 or not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
            raise BundleError(f"task {bundle.name!r}: input size {(c, h, w)} must be 3 channels and "
                              f"1..{MAX_INPUT_SIDE} px per side")
        for what, t in (("head.weight", bundle.head_weight), ("head.bias", bundle.head_bias)):
            if not torch.isfinite(t.to(self.dtype)).all():
                raise BundleError(f"task {bundle.name!r}: {what} overflows the serving dtype {self.dtype}")
        for site, aw in bundle.adapters.items():
            if not all(torch.isfinite(t.to(self.dtype)).all() for t in aw.tensors().values()):
                raise BundleError(f"task {bundle.name!r}: adapter {site} overflows the serving dtype {self.dtype}")
        self._check_input_size(bundle.manifest.preprocess.input_size)
        return self._fold(bundle.name, bundle.adapters) if bundle.adapters else None

    def _check_input_size(self, shape: tuple[int, int, int]) -> None:
        if self._probe is None or shape in self._probed:
            return
        self._probe(shape)
        self._probed.add(shape)

    def _fold(self, name: str, adapters: dict[str, AdapterWeights]) -> TaskDelta:
        on_device = {site: w.to(device=self.device, dtype=torch.float32) for site, w in adapters.items()}
        return self._prepare(name, on_device)

    def _materialize(self, bundle: TaskBundle, *, builtin: bool = False) -> LoadedTask:
        adapters = {site: w.to(dtype=torch.float32) for site, w in bundle.adapters.items()}
        return LoadedTask(
            manifest=bundle.manifest,
            adapters=adapters,
            device_adapters={site: w.to(self.device, self.dtype) for site, w in adapters.items()},
            head_weight=bundle.head_weight.to(self.device, self.dtype),
            head_bias=bundle.head_bias.to(self.device, self.dtype),
            builtin=builtin,
        )

    def _publish(self, task: LoadedTask) -> None:
        old = self._tasks.get(task.name)
        self._tasks = {**self._tasks, task.name: task}
        if old is not None and old.key != task.key:
            self._evict(old.key)

    def _unpublish(self, name: str) -> None:
        tasks = dict(self._tasks)
        old = tasks.pop(name, None)
        if self._builtin is not None and name == self._builtin.name:
            tasks[name] = self._builtin  # the stored override is gone: the backbone's own head again
        self._tasks = tasks
        if old is not None and not old.builtin:
            self._evict(old.key)

    def _cache(self, key: tuple[str, int, int], delta: TaskDelta) -> None:
        with self._delta_lock:
            self._deltas[key] = delta
            self._deltas.move_to_end(key)
            while len(self._deltas) > self.delta_cache_size:
                self._deltas.popitem(last=False)

    def _evict(self, key: tuple[str, int, int]) -> None:
        with self._delta_lock:
            self._deltas.pop(key, None)

    @property
    def head_nbytes(self) -> int:
        return sum(t.head_weight.nbytes + t.head_bias.nbytes for t in self._tasks.values())
