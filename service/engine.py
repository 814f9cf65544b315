"""The inference engine: ONE worker thread owns the model, the live weights and every forward pass.

Routes call :meth:`Engine.submit` (async): the task is made resident on the device first (in a loader
thread, :meth:`Residency.acquire`: never on the worker), then the request's images, already preprocessed
to ``[n, 3, H, W]`` float32, are split into chunks of at most ``max_batch``, queued per task version, and
the returned asyncio futures are resolved by the worker through ``loop.call_soon_threadsafe``. Because
switching (:meth:`Residency.activate`) and forwards run only on the worker, strictly one after the
other, no forward ever sees another task's weights.

This module is the engine's face and its thread: the request API (:meth:`Engine.submit`), control jobs
(:meth:`Engine.call`) and the worker's loop. What the worker does with a batch (weights, forwards, heads)
is :mod:`service.execution`; input-size probes and warm-up, queued with :meth:`Engine.call` and run between
batches, are :mod:`service.warmup`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from repadapter import Backbone
from repadapter.errors import BundleError
from repadapter.inject import Site
from repadapter.predict import Prediction

from .batcher import Mode, Scheduler, WorkItem
from .errors import InferenceFailed, InferenceTimeout, NotReady, ShuttingDown, TaskUnavailable
from .execution import BatchExecutor, ChunkResult, Job
from .metrics import Metrics
from .policy import CostModel, chooser
from .registry import TaskRef
from .residency import DeviceTask, Residency
from .warmup import InputProbe, Shape

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Inference:
    """The answer to one :meth:`Engine.submit`: top-k per image, by the task version it was accepted for."""

    task: TaskRef
    predictions: list[list[Prediction]]
    queue_s: float  # longest wait of its chunks
    inference_s: float  # summed batch time of its chunks
    batch_sizes: list[int]
    modes: list[Mode]
    load_s: float  # waiting for the task to be loaded onto the device (0 when it was resident)


@dataclass(frozen=True)
class EngineConfig:
    policy: str = "auto"
    max_batch: int = 16
    max_delay_s: float = 0.005
    starvation_s: float = 0.2
    max_queue_images: int = 1024
    request_timeout_s: float = 30.0
    control_timeout_s: float = 120.0
    warmup: bool = True


class Engine:
    """Owns the backbone's forward passes and the worker; the tasks' tensors and the live weights belong to
    its :class:`Residency`, whose mutating methods only this worker calls."""

    def __init__(self, backbone: Backbone, sites: list[Site], residency: Residency, *, config: EngineConfig,
                 metrics: Metrics, costs: CostModel | None = None) -> None:
        self.backbone, self.sites, self.residency = backbone, sites, residency
        self.config, self.metrics = config, metrics
        self.costs = costs or CostModel()
        self.device, self.dtype = backbone.device, backbone.dtype
        self.executor = BatchExecutor(backbone, sites, residency, metrics=metrics, costs=self.costs)
        self.probe = InputProbe(self.executor, self.costs, max_batch=config.max_batch, warmup=config.warmup)
        can_mix, choose = chooser(config.policy, self.costs)
        self.scheduler = Scheduler(
            max_batch=config.max_batch, max_delay_s=config.max_delay_s, starvation_s=config.starvation_s,
            max_queued=config.max_queue_images, choose=choose, can_mix=can_mix, live=lambda: residency.live,
        )
        self._control: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._loop, name="repserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still queued get 503 ``shutting_down``."""
        for item in self.scheduler.close():
            job: Job = item.payload
            job.answer(ShuttingDown("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_control()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_task(self) -> str | None:
        """Name of the task whose weights are merged now (``None``: the base weights)."""
        return self.residency.live_name

    def queue_depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (name, *_), n in self.scheduler.depths().items():
            out[name] = out.get(name, 0) + n
        return out

    def memory(self) -> dict[str, int]:
        """Bytes held on the serving device, by kind (for ``repserve_device_memory_bytes``)."""
        model = self.backbone.model
        stats = self.residency.stats()
        out = {
            "backbone": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
            "pristine": self.residency.switcher.pristine_nbytes,
            "pinned": self.residency.pinned_nbytes(),
            "device_tier": stats["device"].nbytes,
            "live_tier": stats["live"].nbytes,
        }
        if self.device.type == "cuda":
            out["allocated"] = torch.cuda.memory_allocated(self.device)
            out["reserved"] = torch.cuda.memory_reserved(self.device)
        return out

    # ---- control jobs (run on the worker between batches) -------------------------------------------

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` on the worker thread between batches and return its result (blocking the caller)."""
        if not self.alive or self.scheduler.closed:
            raise NotReady("the inference engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._control.put((fn, future))
        self.scheduler.interrupt()
        limit = timeout if timeout is not None else self.config.control_timeout_s
        try:
            return future.result(limit)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise InferenceTimeout(f"the inference worker did not get to it within {limit} s") from None

    def check_shape(self, shape: Shape) -> None:
        """Refuse (BundleError, 422) an input size the backbone cannot take, e.g. a fixed-size ViT's; each
        size is probed once, on the worker (with warm-up on: warmed up, which also seeds ``auto``'s costs).
        Blocking: call it off the event loop and off the worker."""
        if not self.probe.known(shape):
            self.call(lambda: self.probe.probe([shape]))
        error = self.probe.verdict(shape)
        if error is not None:
            raise error

    def warmup(self, shapes: Sequence[Shape]) -> dict[str, float | None]:
        """Probe and warm up every input size not seen yet (allocations, kernels), seed the cost model with
        the switch, merged and mixed costs measured there, and return its estimates. A size the backbone
        refuses is recorded (its tasks are refused), not raised."""
        return self.call(lambda: self.probe.probe(shapes))

    # ---- requests (event loop) ----------------------------------------------------------------------

    async def submit(self, task: TaskRef, x: Tensor, top_k: int) -> Inference:
        """Load ``task`` onto the device if needed, queue ``x [n, 3, H, W]`` for it and wait for the answer.

        Raises QueueFull (503) under backpressure, InferenceTimeout (503) after ``request_timeout_s``
        (loading included), TaskUnavailable (503) if the task cannot be loaded or its input size is
        refused, InferenceFailed (500) if the batch failed in the engine.
        """
        if not self.alive:
            raise NotReady("the inference engine is not running")
        loop = asyncio.get_running_loop()
        timeout = self.config.request_timeout_s
        if not self.probe.fine(task.shape):  # not known to be fine: probe (once per size)
            try:
                await asyncio.to_thread(self.check_shape, task.shape)
            except BundleError as e:
                raise TaskUnavailable(f"task {task.name!r}: {e}") from e
        load_start = time.perf_counter()
        entry: DeviceTask | None = None
        try:
            async with asyncio.timeout(timeout):  # a deadline, not a task: the resident case never suspends
                entry = await self.residency.acquire(task)
                load_s = time.perf_counter() - load_start
                chunks = x.split(self.config.max_batch) if x.shape[0] > self.config.max_batch else (x,)
                jobs = [Job(task, entry, chunk, top_k, loop.create_future(), loop) for chunk in chunks]
                items = [WorkItem(task.key, task.weight_key, task.shape, j.x.shape[0], j) for j in jobs]
                self.scheduler.put(items)
                try:
                    results: list[ChunkResult] = [await j.future for j in jobs]
                finally:
                    for item in items:
                        item.abandoned = True  # no-op for served items; unserved ones are dropped unprocessed
        except TimeoutError:
            if entry is None:
                raise InferenceTimeout(f"task {task.name!r} was not loaded within {timeout} s; the server is "
                                       "overloaded") from None
            raise InferenceTimeout(f"no answer within {timeout} s; the server is overloaded") from None
        return Inference(
            task=task,
            predictions=[p for r in results for p in r.predictions],
            queue_s=max(r.queue_s for r in results),
            inference_s=sum(r.inference_s for r in results),
            batch_sizes=[r.batch_size for r in results],
            modes=[r.mode for r in results],
            load_s=load_s,
        )

    # ---- the worker ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        log.info("engine started device=%s dtype=%s policy=%s max_batch=%d",
                 self.device, self.dtype, self.config.policy, self.config.max_batch)
        while True:
            for fn, future in self._control_jobs():
                try:
                    future.set_result(fn())
                except Exception as e:  # reported to the caller, who decides what it means
                    future.set_exception(e)
            if self.executor.broken:
                log.critical("live weights could not be restored: stopping the worker (liveness fails)")
                for item in self.scheduler.close():
                    item.payload.answer(InferenceFailed("the inference worker stopped"))
                break
            if self.scheduler.closed:
                break
            batch = self.scheduler.next_batch()
            if batch is None:
                continue
            try:
                self.executor.serve(batch, self.scheduler.clock())
            except Exception:  # a bug after the answers: keep serving; the requesters time out (503)
                log.exception("unexpected error after a batch size=%d", batch.size)
        self._fail_control()
        log.info("engine stopped")

    def _control_jobs(self) -> Iterator[tuple[Callable[[], Any], concurrent.futures.Future]]:
        """The queued control jobs, each marked running (the ones their caller cancelled are skipped)."""
        while True:
            try:
                fn, future = self._control.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                yield fn, future

    def _fail_control(self) -> None:
        for _fn, future in self._control_jobs():
            future.set_exception(ShuttingDown("the inference engine stopped"))
