"""Building, starting and stopping the long-lived parts of one replica (backbone, registry, engine).

Start-up has two phases, so a replica is *live* quickly and *ready* only when it can answer:

1. :class:`Runtime` construction (in the app's lifespan, before serving): settings -> backbone on its
   device and dtype, adapter sites, switcher, store, registry, engine. A misconfiguration (missing
   checkpoint, CUDA asked but absent) fails here and the process exits with the error.
2. :meth:`Runtime.initialize` (a background thread): start the engine's worker, load the store's tasks,
   warm up every input size; then ``ready`` is set (``/readyz`` turns 200).

Afterwards :meth:`Runtime.poll_store` re-scans the store every ``store_poll_s`` seconds and on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import anyio
import torch

from repadapter import LocalStore, WeightSwitcher, attach_slots, load_backbone
from repadapter.errors import UnsupportedBackbone
from repadapter.inject import Site

from . import __version__
from .engine import Engine, EngineConfig
from .metrics import Metrics, StateSource
from .registry import TaskRegistry
from .settings import Settings

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
        self.switcher = WeightSwitcher(self.sites, hot_cache=settings.hot_cache_size, pack=True)
        self.store = LocalStore(settings.store)
        self.registry = TaskRegistry(
            self.store, self.backbone, self.sites, self.switcher.prepare, metrics=metrics,
            delta_cache_size=settings.delta_cache_size, builtin_task=settings.builtin_task,
        )
        self.engine = Engine(
            self.backbone, self.sites, self.switcher, self.registry, metrics=metrics,
            config=EngineConfig(
                policy=settings.policy, max_batch=settings.max_batch, max_delay_s=settings.max_delay_ms / 1000,
                starvation_s=settings.starvation_ms / 1000, max_queue_images=settings.max_queue_images,
                request_timeout_s=settings.request_timeout_s, warmup=settings.warmup,
            ),
        )
        self.registry.set_probe(self.engine.probe)
        self.ready = threading.Event()
        self.failure: str | None = None
        self._rescan: asyncio.Event | None = None
        metrics.add_state(StateSource(
            queue_depths=self.engine.queue_depths,
            tasks=lambda: [t.name for t in self.registry.tasks()],
            active_task=lambda: self.engine.active_task,
            memory=self.engine.memory,
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
                 len(self.sites), self.store.root)

    # ---- start-up and shutdown ----------------------------------------------------------------------

    def initialize(self) -> None:
        """Phase 2 (blocking; run in a thread): worker, tasks, warm-up, then ready. Failures are kept
        in ``failure`` (``/healthz`` reports them, so the orchestrator restarts the replica)."""
        try:
            self.engine.start()
            report = self.registry.sync()
            tasks = self.registry.tasks()
            if self.settings.warmup:
                shapes = [self.backbone.preprocess.input_size, *(t.shape for t in tasks)]
                self.engine.warmup(shapes)
            self.ready.set()
            log.info("ready tasks=%d failed=%s", len(tasks), report.failed)
        except Exception as e:
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("start-up failed")

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.initialize, name="repserve-init", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.ready.clear()
        self.engine.stop()
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
        """Ask for a store re-scan now (SIGHUP handler; call on the event loop's thread)."""
        if self._rescan is not None:
            self._rescan.set()

    async def poll_store(self) -> None:
        """Re-scan the store every ``store_poll_s`` seconds (0: only on request) once ready; runs forever."""
        self._rescan = asyncio.Event()
        interval = self.settings.store_poll_s or None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), interval)
            self._rescan.clear()
            if self.ready.is_set():
                await anyio.to_thread.run_sync(self.registry.sync)


def _attach(model: object, arch: str) -> list[Site]:
    """Adapter sites (placement ``block``: a superset of ``attn``, so bundles of either placement fit);
    a backbone we cannot adapt still serves head-only tasks (linear probes, its own classifier)."""
    try:
        return attach_slots(model, "block")
    except UnsupportedBackbone as e:
        log.warning("no adapter sites backbone=%s reason=%s: serving head-only tasks", arch, e)
        return []
