"""Building, starting and stopping the long-lived parts of one replica, and the operations that span them.

Start-up has two phases, so a replica is *live* quickly and *ready* only when it can answer:

1. :class:`Runtime` construction (in the app's lifespan, before serving): settings -> backbone on its
   device and dtype, adapter sites, store, validator, registry, residency (with the switcher), engine. A
   misconfiguration (missing checkpoint, CUDA asked but absent) fails here and the process exits with it.
2. :meth:`Runtime.initialize` (a background thread): start the engine's worker, read the store's catalog
   and manifests (no tensors: tasks load on first use), warm up every input size; then ``ready`` is set.

Afterwards :meth:`Runtime.poll_store` re-reads the catalog every ``store_poll_s`` seconds (two ``stat``
calls while nothing changed) and walks the store on SIGHUP. Registering and deleting a task touch the
registry (names, versions, the store) and the residency (tensors), in that order; the runtime does both,
so neither calls the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time

import anyio
import torch
from torch import Tensor

from repadapter import WeightSwitcher, attach_slots, load_backbone, mixed_batch
from repadapter.bundle import PackedBundle
from repadapter.errors import UnsupportedBackbone
from repadapter.inject import Site
from repadapter.store import open_store

from . import __version__
from .engine import Engine, EngineConfig
from .metrics import Metrics, StateSource
from .registry import SyncReport, TaskRef, TaskRegistry, builtin_bundle
from .residency import DeviceTask, Residency, ResidencyConfig
from .settings import Settings
from .validation import TaskValidator, check_probe, probe_input

log = logging.getLogger(__name__)


class Runtime:
    """Everything one replica holds for its lifetime; reached by routes through ``app.state.runtime``."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        device = settings.resolved_device()
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("REPSERVE_DEVICE=cuda but CUDA is not available on this machine")
        if device == "cpu" and settings.dtype == "float16":
            log.warning("dtype=float16 on the CPU is slow and not every op supports it; prefer bfloat16")
        self._threads_before = torch.get_num_threads()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)  # process-wide; restored by close()
        self.backbone = load_backbone(settings.backbone, settings.checkpoint, device=device,
                                      dtype=settings.torch_dtype, seed=settings.seed, **settings.backbone_options)
        self.sites = _attach(self.backbone.model, self.backbone.arch)
        self.store = open_store(settings.store, endpoint_url=settings.s3_endpoint_url)
        validator = TaskValidator(self.backbone, self.sites)
        builtin = builtin_bundle(settings.builtin_task, self.backbone) if settings.builtin_task else None
        self.registry = TaskRegistry(self.store, validator, metrics=metrics, builtin=builtin)
        self.residency = Residency(
            self.store, validator, WeightSwitcher(self.sites, pack=True), device=self.backbone.device,
            dtype=self.backbone.dtype, metrics=metrics,
            config=ResidencyConfig(host_bytes=settings.host_cache_bytes, device_bytes=settings.device_cache_bytes,
                                   live_bytes=settings.live_cache_bytes, loader_threads=settings.loader_threads,
                                   eager_fold=settings.policy == "merged"),
        )
        for task in self.registry.tasks():
            if task.builtin:
                self.residency.pin(task)
        self.engine = Engine(
            self.backbone, self.sites, self.residency, metrics=metrics,
            config=EngineConfig(
                policy=settings.policy, max_batch=settings.max_batch, max_delay_s=settings.max_delay_ms / 1000,
                starvation_s=settings.starvation_ms / 1000, max_queue_images=settings.max_queue_images,
                request_timeout_s=settings.request_timeout_s, warmup=settings.warmup,
            ),
        )
        self.ready = threading.Event()
        self.failure: str | None = None
        self._rescan: asyncio.Event | None = None
        self._walk = False
        metrics.add_state(StateSource(
            queue_depths=self.engine.queue_depths,
            task_count=lambda: len(self.registry),
            active_task=lambda: self.engine.active_task,
            memory=self.engine.memory,
            caches=self.residency.stats,
            ready=self.ready.is_set,
        ))
        metrics.build_info.info({
            "version": __version__, "backbone": self.backbone.arch, "fingerprint": self.backbone.fingerprint,
            "device": str(self.backbone.device), "dtype": settings.dtype, "policy": settings.policy,
        })
        if settings.admin_token is None:
            log.warning("REPSERVE_ADMIN_TOKEN is not set: POST/DELETE /tasks are open to every client")
        log.info("runtime built backbone=%s fingerprint=%s device=%s dtype=%s sites=%d store=%s",
                 self.backbone.arch, self.backbone.fingerprint[:12], self.backbone.device, settings.dtype,
                 len(self.sites), self.store.url)

    # ---- operations on tasks (any thread but the event loop's and the worker's) -----------------------

    def sync(self, *, rescan: bool = False) -> SyncReport:
        """Re-read the store (``rescan``: walk it) and drop the cached state of versions no longer served."""
        report = self.registry.sync(rescan=rescan)
        self.residency.forget(report.stale)
        return report

    def register(self, packed: PackedBundle, *, overwrite: bool = False) -> TaskRef:
        """Validate a bundle completely (tensors, input size on the engine, its preprocessing and the fold into
        the base weights, a probe forward whose logits must be finite), then write it to the store as the
        task's next version and serve it at once, already resident. A refused bundle leaves nothing behind:
        the device entry built for the checks is dropped, nothing is written."""
        self.registry.validator.check_bundle(packed)
        self.engine.check_shape(packed.manifest.preprocess.input_size)
        x = probe_input(packed.manifest)
        entry = self.residency.build(packed, fold=True)
        self.engine.call(functools.partial(self._probe, packed.name, entry, x))
        task, replaced = self.registry.register(packed, overwrite=overwrite)
        self.residency.admit(task, PackedBundle(task.manifest, packed.buffer, packed.layout), entry)
        if replaced is not None and not replaced.builtin:
            self.residency.forget([replaced])
        return task

    def _probe(self, name: str, entry: DeviceTask, x: Tensor) -> None:
        """On the engine's worker: the task on ``x [1, 3, H, W]`` as a mixed batch runs it (the base weights
        live, its row folds applied, its head in the serving dtype); refuses non-finite output."""
        try:
            self.residency.activate(None, None)
        except BaseException:
            self.residency.reset()
            raise
        x = x.to(self.backbone.device, self.backbone.dtype)
        with torch.no_grad():
            if entry.folds is None:
                feats = self.backbone.model(x)
            else:
                rows = torch.zeros(1, dtype=torch.long, device=self.backbone.device)
                with mixed_batch(self.sites, [entry.folds], rows):
                    feats = self.backbone.model(x)
            logits = torch.addmm(entry.head_bias, feats, entry.head_weight.t())  # [1, C]
        check_probe(name, self.backbone.dtype, feats, logits)

    def delete(self, name: str) -> TaskRef | None:
        """Delete a task from the store and stop serving it (queued requests still finish)."""
        deleted = self.registry.delete(name)
        if deleted is not None:
            self.residency.forget([deleted])
        return deleted

    # ---- start-up and shutdown ----------------------------------------------------------------------

    def initialize(self) -> None:
        """Phase 2 (blocking; run in a thread): worker, tasks, warm-up, then ready. Failures are kept
        in ``failure`` (``/healthz`` reports them, so the orchestrator restarts the replica)."""
        try:
            self.engine.start()
            report = self.sync(rescan=True)
            shapes = dict.fromkeys([self.backbone.preprocess.input_size, *(t.shape for t in self.registry.tasks())])
            self.engine.warmup(list(shapes))
            self.ready.set()
            log.info("ready tasks=%d failed=%s input_sizes=%d", len(self.registry), report.failed[:20], len(shapes))
        except Exception as e:
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("start-up failed")
            return
        self.collect_garbage()

    def collect_garbage(self) -> None:
        """The store's ``gc`` with ``store_gc_grace_s`` as its grace (after start-up, off the request path): a
        directory store removes every crashed writer's temp entry (its writers hold its lock, so no grace is
        needed), S3 the unreferenced tensors and deleted tasks' objects older than the grace. Every replica
        does it, which is harmless: gc never touches a readable version."""
        if not self.settings.store_gc_grace_s:
            return
        try:
            self.store.gc(older_than_s=self.settings.store_gc_grace_s)
        except Exception as e:  # a read-only or unreachable store must not take the replica down
            log.warning("store gc failed store=%s error=%s", self.store.url, e)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until start-up finished (for embedders that route only to ready replicas, e.g. Ray Serve);
        raises ``RuntimeError`` if it failed or took longer than ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.failure is not None:
                raise RuntimeError(f"RepServe start-up failed: {self.failure}")
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"RepServe not ready after {timeout} s")

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.initialize, name="repserve-init", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.ready.clear()
        self.engine.stop()
        self.residency.close()
        if self.settings.torch_threads:
            torch.set_num_threads(self._threads_before)

    @property
    def healthy(self) -> tuple[bool, str]:
        """Liveness: start-up did not fail and, once started, the engine's worker runs."""
        if self.failure is not None:
            return False, f"start-up failed: {self.failure}"
        if self.ready.is_set() and not self.engine.alive:
            return False, "the inference worker stopped"
        return True, "ok"

    # ---- store re-scans -----------------------------------------------------------------------------

    def request_rescan(self) -> None:
        """Ask for a store walk now (SIGHUP handler; call on the event loop's thread): it also finds changes
        made by hand, which the catalog does not record."""
        self._walk = True
        if self._rescan is not None:
            self._rescan.set()

    async def poll_store(self) -> None:
        """Re-read the store's catalog every ``store_poll_s`` seconds (0: only on request) once ready; runs
        forever."""
        self._rescan = asyncio.Event()
        interval = self.settings.store_poll_s or None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), interval)
            self._rescan.clear()
            walk, self._walk = self._walk, False
            if self.ready.is_set():
                await anyio.to_thread.run_sync(functools.partial(self.sync, rescan=walk))


def _attach(model: object, arch: str) -> list[Site]:
    """Adapter sites (placement ``block``: a superset of ``attn``, so bundles of either placement fit);
    a backbone we cannot adapt still serves head-only tasks (linear probes, its own classifier)."""
    try:
        return attach_slots(model, "block")
    except UnsupportedBackbone as e:
        log.warning("no adapter sites backbone=%s reason=%s: serving head-only tasks", arch, e)
        return []
