"""The task registry: which task versions this replica serves, by name, kept in step with the store's catalog.

It holds manifests only. A :class:`TaskRef` is immutable and bound to one stored task version; a request
holds the one current when it was accepted, so replacing or deleting a task never changes what a queued
request is answered with (the response names that version). The tensors of a task are the residency's
(:mod:`service.residency`): loaded on first use, kept in byte-bounded tiers, dropped when cold.

Scans are change-based: :meth:`Store.catalog` costs two ``stat`` calls (one HEAD request on S3) while the
store is unchanged, and on a change only the manifests of new or changed entries are read and checked
(:meth:`TaskValidator.check_manifest`). A manifest that fails is logged and counted
(``repserve_store_errors_total``) once per stored version, and the previously served version keeps being
served. Registration validates the tensors completely before anything is written (the caller,
:class:`service.lifecycle.Runtime`, also probes the input size on the engine and folds the adapters).

Thread-safety: readers (``get``, ``tasks``) see an immutable snapshot dict, replaced wholesale by writers;
writers (``register``, ``delete``, ``sync``) serialise on one (re-entrant) lock, so a scan never interleaves with
a registration, and :meth:`TaskRegistry.at_version` holds it across a conditional change.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from repadapter import AdapterConfig, Backbone, BackboneRef, Manifest
from repadapter.bundle import PackedBundle, parse_manifest
from repadapter.errors import BundleError, RepServeError, TaskExists, TaskNotFound, VersionMismatch
from repadapter.store import Catalog, Store

from .errors import BuiltinTask, http_status
from .metrics import Metrics
from .validation import TaskValidator

log = logging.getLogger(__name__)

TaskKey = tuple[str, int, int]
"""``(name, version, serial)``: identifies one served task version in queues and residency tiers."""

_serials = itertools.count(1)


@dataclass(frozen=True, eq=False)
class TaskRef:
    """One served task version, by its manifest. ``inline`` holds the tensors of a task served from memory
    instead of the store (the backbone's own classifier).

    ``serial`` is unique per object: a task deleted and registered again restarts at version 1, so
    ``(name, version)`` alone could let queued requests of the old one share cached state with the new one.
    """

    manifest: Manifest
    etag: str = ""
    inline: PackedBundle | None = None
    serial: int = field(default_factory=lambda: next(_serials))

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def key(self) -> TaskKey:
        return self.name, self.version, self.serial

    @property
    def builtin(self) -> bool:
        return self.inline is not None

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.manifest.preprocess.input_size

    @property
    def weight_key(self) -> Hashable:
        """The weight set a merged forward needs: ``None`` (the base weights) for a task without adapters
        (the manifest says so, and loading checks that the tensors agree), else the task's own key."""
        return self.key if self.manifest.adapter.hidden else None


@dataclass
class SyncReport:
    """What one store scan changed. ``stale``: versions no longer served (replaced or removed), whose
    cached tensors can go."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stale: list[TaskRef] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)


class TaskRegistry:
    """Task name -> :class:`TaskRef`, backed by a :class:`Store`; the backbone's own classifier, when
    given as ``builtin``, is served under its name unless the store holds a task of that name."""

    def __init__(self, store: Store, validator: TaskValidator, *, metrics: Metrics,
                 builtin: PackedBundle | None = None) -> None:
        self.store, self.validator, self.metrics = store, validator, metrics
        self._builtin = TaskRef(builtin.manifest, inline=builtin) if builtin is not None else None
        self._tasks: dict[str, TaskRef] = {self._builtin.name: self._builtin} if self._builtin else {}
        self._catalog: Catalog | None = None
        self._failed: set[tuple[str, str]] = set()  # (name, etag) of stored versions whose manifest failed
        self._write = threading.RLock()  # re-entrant: a writer may run inside at_version()

    # ---- reading (any thread) -----------------------------------------------------------------------

    def get(self, name: str) -> TaskRef:
        task = self._tasks.get(name)
        if task is None:
            raise TaskNotFound(f"no task {name!r} (GET /tasks lists the served tasks)")
        return task

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def tasks(self) -> list[TaskRef]:
        return sorted(self._tasks.values(), key=lambda t: t.name)

    # ---- writing ------------------------------------------------------------------------------------

    def register(self, packed: PackedBundle, *, overwrite: bool = False) -> tuple[TaskRef, TaskRef | None]:
        """Write an already validated bundle to the store as the task's next version and serve it at once;
        returns the new version and the one it replaced (``None`` if new)."""
        with self._write:
            current = self._tasks.get(packed.name)
            if current is not None and not overwrite:
                raise TaskExists(f"task {packed.name!r} is served (version {current.version}); "
                                 "pass overwrite=true to replace it")
            manifest = self.store.put(packed.unpack(), overwrite=overwrite)
            task = TaskRef(manifest, self.store.entry(manifest.name, manifest.version).etag)
            self._tasks = {**self._tasks, task.name: task}
        log.info("registered task=%s version=%d", task.name, task.version)
        return task, current

    @contextlib.contextmanager
    def at_version(self, name: str, version: int) -> Iterator[TaskRef]:
        """While ``name`` is served at ``version``: the block runs holding the write lock, so no registration,
        deletion or scan of this replica changes the task before the block's own change (``DELETE
        /tasks/NAME?version=N``). Raises :class:`TaskNotFound`, or :class:`VersionMismatch` (409) when another
        version is served: the caller looked before the task was replaced."""
        with self._write:
            current = self.get(name)
            if current.version != version:
                raise VersionMismatch(f"task {name!r} is at version {current.version}, not {version} (replaced "
                                      "since you looked?): nothing changed")
            yield current

    def delete(self, name: str) -> TaskRef | None:
        """Remove a task from the store and stop serving it; returns the version that was served.

        Requests already accepted keep their :class:`TaskRef` and are still answered by it.
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
            tasks = dict(self._tasks)
            self._drop(tasks, name)
            self._tasks = tasks
        log.info("deleted task=%s version=%s", name, current.version if current else None)
        return current

    def sync(self, *, rescan: bool = False) -> SyncReport:
        """Bring the served versions in line with the store's catalog (``rescan``: walk the directories,
        for changes made by hand). Reads the manifests of new or changed entries only."""
        report = SyncReport()
        with self._write:
            try:
                catalog = self.store.catalog(rescan=rescan)
            except (OSError, RepServeError) as e:
                self.metrics.store_errors.labels(reason="scan").inc()
                log.error("store scan failed store=%s error=%s", self.store.url, e)
                return report
            if catalog is not self._catalog:
                self._apply(catalog, report)
                self._catalog = catalog
        self.metrics.store_last_scan.set_to_current_time()
        if report.changed or report.failed:
            log.info("store synced added=%d replaced=%d removed=%d failed=%s tasks=%d", len(report.added),
                     len(report.replaced), len(report.removed), report.failed[:20], len(self._tasks))
        return report

    # ---- internals (write lock held) ------------------------------------------------------------------

    def _apply(self, catalog: Catalog, report: SyncReport) -> None:
        tasks = dict(self._tasks)
        for name, entry in catalog.entries.items():
            current = tasks.get(name)
            if current is not None and not current.builtin and current.etag == entry.etag:
                continue
            if (name, entry.etag) in self._failed:
                continue
            try:
                manifest = parse_manifest(self.store.manifest_bytes(name, entry.version))
                if (manifest.name, manifest.version) != (name, entry.version):
                    raise BundleError(f"the manifest stored as {name!r} version {entry.version} names "
                                      f"{manifest.name!r} version {manifest.version}")
                self.validator.check_manifest(manifest)
            except TaskNotFound:
                continue  # deleted between listing and reading
            except (OSError, RepServeError) as e:
                if isinstance(e, RepServeError) and http_status(type(e)) < 500:
                    self._failed.add((name, entry.etag))  # a bad manifest stays bad: not retried (I/O is)
                reason = e.code if isinstance(e, RepServeError) else "io"
                self.metrics.store_errors.labels(reason=reason).inc()
                log.warning("store task rejected task=%s version=%d reason=%s detail=%s",
                            name, entry.version, reason, e)
                report.failed.append(name)
                continue
            tasks[name] = TaskRef(manifest, entry.etag)
            if current is None or current.builtin:
                report.added.append(name)
            else:
                report.replaced.append(name)
                report.stale.append(current)
        for name, task in list(tasks.items()):
            if not task.builtin and name not in catalog.entries:
                report.removed.append(name)
                report.stale.append(task)
                self._drop(tasks, name)
        self._tasks = tasks
        self._failed = {(n, e) for n, e in self._failed if n in catalog.entries and catalog.entries[n].etag == e}

    def _drop(self, tasks: dict[str, TaskRef], name: str) -> None:
        """Stop serving ``name`` in ``tasks``; the backbone's own classifier comes back under its name."""
        tasks.pop(name, None)
        if self._builtin is not None and name == self._builtin.name:
            tasks[name] = self._builtin


def builtin_bundle(name: str, backbone: Backbone) -> PackedBundle | None:
    """The backbone's own classifier as a task (no adapters), or ``None`` if it has none."""
    if backbone.classifier is None:
        return None
    weight, bias = backbone.classifier
    labels = backbone.labels or [f"class_{i}" for i in range(weight.shape[0])]
    manifest = Manifest(
        name=name, version=0, labels=labels, method="pretrained", adapter=AdapterConfig(hidden=0),
        backbone=BackboneRef(arch=backbone.arch, fingerprint=backbone.fingerprint), preprocess=backbone.preprocess,
        description=f"the {backbone.arch} backbone's own classifier",
    )
    return PackedBundle.from_tensors(manifest, {"head.weight": weight.float().cpu(), "head.bias": bias.float().cpu()})
