"""Tiered, lazy task residency: where each task's tensors are, and the one owner of the model-derived state.

Like a CPU's caches, a task moves up through tiers as it is used and falls out of them when cold; each
tier above the store is a byte-bounded LRU (:class:`service.lru.ByteLRU`) with its own setting:

    store    ->  host               ->  device                         ->  live
    (files)      PackedBundle: the      DeviceTask: adapters, row         MergedWeights: the task's merged
                 verified bundle as     folds and head on the serving     weights, so switching back to it
                 one float32 buffer     device; its fold once merged      is one copy

A request for a task that is not on the device loads it on the request path (:meth:`Residency.acquire`),
in a loader thread, never on the engine's worker: other tasks' batches keep running meanwhile. Concurrent
requests for one cold task share one load. A stored task that fails its checks when first loaded is
answered with :class:`TaskUnavailable` for that task only, counted once and not loaded again until the
store changes it (an I/O error is retried after ``io_retry_s``, on a later request, never in a loop).

"Which weights are live" is recorded here and only here (:attr:`Residency.live`); the scheduler reads it
to prefer batches that need no switch. :meth:`activate` mutates the model's weights, so only the engine's
worker calls it (as it does :meth:`fold` and :meth:`reset`); everything else is thread-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from repadapter import AdapterWeights, TaskDelta, WeightSwitcher
from repadapter.bundle import PackedBundle
from repadapter.errors import RepServeError, TaskNotFound
from repadapter.merge import MergedWeights
from repadapter.mixed import PackedFolds
from repadapter.store import Store

from .errors import TaskUnavailable, http_status
from .lru import ByteLRU, CacheStats
from .metrics import Metrics
from .registry import TaskKey, TaskRef
from .validation import TaskValidator

log = logging.getLogger(__name__)


def _storage_nbytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


@dataclass(eq=False)
class DeviceTask:
    """A task ready to serve on the serving device: what merged and mixed batches need.

    ``packed`` is the bundle with its float32 buffer on the device (one host-to-device copy; the merged fold
    is computed from it); ``folds`` (mixed batches; ``None`` without adapters) and the head are in the
    serving dtype. On a CPU in float32 the buffer and the head are the host tier's own (no copy; the bytes
    are then counted in both tiers, so the sum of the tiers is an upper bound).
    """

    packed: PackedBundle
    folds: PackedFolds | None
    head_weight: Tensor  # [C, F]
    head_bias: Tensor  # [C]
    delta: TaskDelta | None = None  # the merged fold: at first merged use (or at load, ``eager_fold``)

    def adapters(self) -> dict[str, AdapterWeights]:
        """The adapters as views of the device buffer (float32): the merged fold's input."""
        return self.packed.unpack().adapters

    def nbytes(self) -> int:
        tensors = [self.packed.buffer, self.head_weight, self.head_bias]
        tensors += [self.folds.buffer] if self.folds is not None else []
        if self.delta is not None:
            tensors += [t for d in self.delta.targets.values() for t in (d.u, d.a, *d.dc_parts)]
        return _storage_nbytes(tensors)


@dataclass(frozen=True)
class ResidencyConfig:
    host_bytes: int
    device_bytes: int
    live_bytes: int
    loader_threads: int = 2
    eager_fold: bool = False  # fold at load (every batch merged) rather than at first merged use
    io_retry_s: float = 5.0


class Residency:
    """The host, device and live tiers of one replica, their loader, and the live-weights record."""

    def __init__(self, store: Store, validator: TaskValidator, switcher: WeightSwitcher, *,
                 device: torch.device, dtype: torch.dtype, config: ResidencyConfig, metrics: Metrics) -> None:
        self.store, self.validator, self.switcher = store, validator, switcher
        self.device, self.dtype, self.config, self.metrics = device, dtype, config, metrics
        self.host: ByteLRU[TaskKey, PackedBundle] = ByteLRU("host", config.host_bytes)
        self.on_device: ByteLRU[TaskKey, DeviceTask] = ByteLRU("device", config.device_bytes)
        self.merged: ByteLRU[TaskKey, MergedWeights] = ByteLRU("live", config.live_bytes)
        self.live: TaskKey | None = None  # the weight set merged into the model now (None: the base)
        self._pinned: dict[TaskKey, DeviceTask] = {}
        self._inflight: dict[TaskKey, concurrent.futures.Future[DeviceTask]] = {}
        self._failed: dict[TaskKey, tuple[RepServeError, float]] = {}  # error, monotonic time to retry at
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, config.loader_threads),
                                                           thread_name_prefix="repserve-loader")

    # ---- getting a task onto the device (any thread) -------------------------------------------------

    async def acquire(self, task: TaskRef) -> DeviceTask:
        """The task on the device: at once when resident, else after a load in a loader thread (shared by
        every request that waits for it). Raises :class:`TaskUnavailable` if its stored bundle is bad."""
        entry = self.resident(task)
        if entry is not None:
            return entry
        # shield: a request that gives up must not cancel a load other requests wait for
        return await asyncio.shield(asyncio.wrap_future(self._load_future(task)))

    def acquire_blocking(self, task: TaskRef) -> DeviceTask:
        """:meth:`acquire` for threads without an event loop (start-up, benchmarks)."""
        entry = self.resident(task)
        return entry if entry is not None else self._load_future(task).result()

    def tier(self, task: TaskRef) -> str:
        """The highest tier holding the task: ``device``, ``host`` or ``store``."""
        if task.key in self._pinned or task.key in self.on_device:
            return "device"
        return "host" if task.key in self.host else "store"

    def pin(self, task: TaskRef) -> None:
        """Keep a task served from memory (``task.inline``: the backbone's own classifier) on the device for
        good, outside the tiers."""
        assert task.inline is not None
        self._pinned[task.key] = self.build(task.inline, fold=False)

    def admit(self, task: TaskRef, packed: PackedBundle, entry: DeviceTask) -> None:
        """Put a task that was just registered (validated, built) into the host and device tiers, so its
        first request does not read it back from the store."""
        self.host.put(task.key, packed, packed.nbytes)
        self.on_device.put(task.key, entry, entry.nbytes())

    def forget(self, tasks: list[TaskRef]) -> None:
        """Drop every tier's state of versions no longer served (replaced or deleted). Requests holding
        their :class:`DeviceTask` still finish with it."""
        with self._lock:
            for task in tasks:
                self._failed.pop(task.key, None)
        for task in tasks:
            for tier in (self.host, self.on_device, self.merged):
                tier.pop(task.key)

    def build(self, packed: PackedBundle, *, fold: bool) -> DeviceTask:
        """A task's device form: one copy of its buffer to the device, its row folds (one buffer, a few
        indexed ops) and head in the serving dtype, and (``fold``) its merged fold, which also checks that
        folding does not overflow."""
        on_device = PackedBundle(packed.manifest, packed.buffer.to(self.device), packed.layout)
        adapted = bool(packed.manifest.adapter.hidden)
        entry = DeviceTask(
            packed=on_device, folds=PackedFolds.of(on_device, dtype=self.dtype) if adapted else None,
            head_weight=on_device.tensor("head.weight").to(self.dtype),
            head_bias=on_device.tensor("head.bias").to(self.dtype),
        )
        if fold and adapted:
            entry.delta = self.switcher.prepare(packed.name, entry.adapters())
        return entry

    def resident(self, task: TaskRef) -> DeviceTask | None:
        """The task on the device if it is there now (counted as a device-tier hit or miss)."""
        pinned = self._pinned.get(task.key)
        return pinned if pinned is not None else self.on_device.get(task.key)

    def _load_future(self, task: TaskRef) -> concurrent.futures.Future[DeviceTask]:
        with self._lock:
            failed = self._failed.get(task.key)
            if failed is not None and time.monotonic() < failed[1]:
                future: concurrent.futures.Future[DeviceTask] = concurrent.futures.Future()
                future.set_exception(failed[0])
                return future
            future = self._inflight.get(task.key)
            if future is None:
                future = self._pool.submit(self._load, task)
                self._inflight[task.key] = future
            return future

    def _load(self, task: TaskRef) -> DeviceTask:
        """Loader thread: store -> host (if needed) -> device, then no longer in flight (the device tier
        answers from then on). Failures become :class:`TaskUnavailable`."""
        try:
            return self._load_tiers(task)
        finally:
            with self._lock:
                self._inflight.pop(task.key, None)

    def _load_tiers(self, task: TaskRef) -> DeviceTask:
        try:
            packed = self._host_bundle(task)
            start = time.perf_counter()
            entry = self.build(packed, fold=self.config.eager_fold)
        except TaskNotFound as e:  # deleted (or deleted and stored again) after the request was accepted
            self.metrics.store_errors.labels(reason="changed").inc()
            log.info("task load found the version gone task=%s version=%d detail=%s", task.name, task.version, e)
            raise TaskNotFound(f"task {task.name!r} version {task.version} was deleted while this request waited "
                               "for it to load") from e
        except RepServeError as e:
            transient = http_status(type(e)) >= 500
            raise self._fail(task, e.code, f"task {task.name!r} version {task.version} cannot be loaded: {e}",
                             retry_s=self.config.io_retry_s if transient else math.inf) from e
        except OSError as e:
            raise self._fail(task, "io", f"task {task.name!r} version {task.version} cannot be read from the "
                             f"store: {e}", retry_s=self.config.io_retry_s) from e
        self.on_device.put(task.key, entry, entry.nbytes())
        self._count_load("device", time.perf_counter() - start)
        return entry

    def _host_bundle(self, task: TaskRef) -> PackedBundle:
        if task.inline is not None:
            return task.inline
        packed = self.host.get(task.key)
        if packed is not None:
            return packed
        start = time.perf_counter()
        packed = self.store.get_packed(task.name, task.version)
        if packed.manifest.tensors_sha256 != task.manifest.tensors_sha256:
            raise TaskNotFound("its stored tensors are not the ones its manifest was listed with")
        self.validator.check_bundle(packed)
        self.host.put(task.key, packed, packed.nbytes)
        self._count_load("host", time.perf_counter() - start)
        return packed

    def _count_load(self, tier: str, seconds: float) -> None:
        self.metrics.task_loads.labels(tier=tier).inc()
        self.metrics.task_load_duration.labels(tier=tier).observe(seconds)

    def _fail(self, task: TaskRef, reason: str, detail: str, *, retry_s: float) -> TaskUnavailable:
        """Record a failed load (answered at once until ``retry_s`` passed) and count it once."""
        error = TaskUnavailable(detail, retry_after_s=None if math.isinf(retry_s) else retry_s)
        with self._lock:
            if retry_s > 0:
                self._failed[task.key] = (error, time.monotonic() + retry_s)
        self.metrics.store_errors.labels(reason=reason).inc()
        log.warning("task load failed task=%s version=%d reason=%s detail=%s", task.name, task.version, reason,
                    detail)
        return error

    # ---- the live weights (changed by the engine's worker only; ``live``/``live_name`` read anywhere) ---

    @property
    def live_name(self) -> str | None:
        """Name of the task whose weights are live (``None``: the base)."""
        return self.live[0] if self.live is not None else None

    def fold(self, task: TaskRef, entry: DeviceTask) -> TaskDelta:
        """The task's merged fold, computed on first use and kept with its device entry."""
        if entry.delta is None:
            try:
                entry.delta = self.switcher.prepare(task.name, entry.adapters())
            except RepServeError as e:
                self.forget([task])
                raise self._fail(task, e.code, f"task {task.name!r} version {task.version} cannot be merged: "
                                 f"{e}", retry_s=math.inf) from e
            self.on_device.resize(task.key, entry.nbytes())
        return entry.delta

    def activate(self, task: TaskRef | None, entry: DeviceTask | None) -> bool:
        """Make ``task``'s merged weights live (``None``, or a task without adapters: the base); ``False``
        if they already were. From the live tier when the task is there (one copy), else computed from
        pristine and kept there if it fits. If it raises, the weights are in an unknown state: the caller
        must :meth:`reset` them."""
        key = task.weight_key if task is not None else None
        if key == self.live:
            return False
        if task is None or entry is None or key is None:
            self.switcher.activate(None)
            self.live = None
            return True
        delta = self.fold(task, entry)
        merged = self.merged.get(key)
        self.live = None  # unknown until the switch completes
        self.switcher.activate(delta, merged)
        self.live = key
        if merged is None:
            nbytes = self.switcher.snapshot_nbytes(delta)
            if nbytes <= self.merged.capacity:
                self.merged.put(key, self.switcher.snapshot(delta), nbytes)
        return True

    def reset(self) -> None:
        """Restore every target from pristine, whatever state the weights are in."""
        self.live = None
        self.switcher.reset()

    # ---- reporting (any thread) ------------------------------------------------------------------------

    def stats(self) -> dict[str, CacheStats]:
        return {"host": self.host.stats(), "device": self.on_device.stats(), "live": self.merged.stats()}

    def pinned_nbytes(self) -> int:
        return sum(e.nbytes() for e in self._pinned.values())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
