"""The inference engine: ONE worker thread owns the model, the live weights and every forward pass.

Routes call :meth:`Engine.submit` (async): the task is made resident on the device first (in a loader
thread, :meth:`Residency.acquire`: never on the worker), then the request's images, already preprocessed
to ``[n, 3, H, W]`` float32, are split into chunks of at most ``max_batch``, queued per task version, and
the returned asyncio futures are resolved by the worker through ``loop.call_soon_threadsafe``. Because
switching (:meth:`Residency.activate`) and forwards run only on the worker, strictly one after the
other, no forward ever sees another task's weights.

Per batch the worker either makes the batch's weights live (``merged``: one adapter task, or tasks
without adapters on the base weights) or restores the base and runs ``mixed_batch`` (per-row adapters of
several tasks). Then each request's rows go through its own task's head (serving dtype), softmax in
float32, top-k. Other work that must touch the model (warm-up, input-size probes) is queued with
:meth:`Engine.call` and runs between batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from repadapter import AdapterConfig, Backbone, BackboneRef, Manifest, mixed_batch
from repadapter.bundle import PackedBundle
from repadapter.errors import BundleError, RepServeError
from repadapter.inject import Site
from repadapter.mixed import PackedFolds

from .batcher import Batch, Mode, Scheduler, WorkItem
from .errors import InferenceFailed, InferenceTimeout, NotReady, ShuttingDown, TaskUnavailable
from .metrics import Metrics
from .policy import CostModel, chooser
from .registry import TaskRef
from .residency import DeviceTask, Residency

log = logging.getLogger(__name__)

T = TypeVar("T")
Prediction = tuple[str, float]
Shape = tuple[int, int, int]


@dataclass(eq=False)
class _Job:
    """Payload of one queued chunk: the task version it was accepted for, that task on the device (held
    here, so evicting it from the device tier cannot pull it from under a queued request), its rows."""

    task: TaskRef
    entry: DeviceTask
    x: Tensor  # [n, 3, H, W] float32, CPU
    top_k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True)
class _ChunkResult:
    predictions: list[list[Prediction]]
    queue_s: float
    inference_s: float
    batch_size: int
    mode: Mode


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


def _resolve(future: asyncio.Future, value: Any) -> None:
    if future.done():  # the requester gave up (timeout, disconnect)
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


class Engine:
    """Owns the backbone's forward passes and the worker; the tasks' tensors and the live weights belong to
    its :class:`Residency`, whose mutating methods only this worker calls."""

    def __init__(self, backbone: Backbone, sites: list[Site], residency: Residency, *, config: EngineConfig,
                 metrics: Metrics, costs: CostModel | None = None) -> None:
        self.backbone, self.sites, self.residency = backbone, sites, residency
        self.config, self.metrics = config, metrics
        self.costs = costs or CostModel()
        self.device, self.dtype = backbone.device, backbone.dtype
        can_mix, choose = chooser(config.policy, self.costs)
        self.scheduler = Scheduler(
            max_batch=config.max_batch, max_delay_s=config.max_delay_s, starvation_s=config.starvation_s,
            max_queued=config.max_queue_images, choose=choose, can_mix=can_mix, live=lambda: residency.live,
        )
        self._control: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._shapes: dict[Shape, BundleError | None] = {}  # input sizes probed: None = the backbone takes it
        self._broken = False  # live weights in an unknown state: never serve again

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._loop, name="repserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still queued get 503 ``shutting_down``."""
        for item in self.scheduler.close():
            job: _Job = item.payload
            self._answer(job, ShuttingDown("the server is shutting down"))
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
        shape = tuple(shape)
        if shape not in self._shapes:
            self.call(lambda: self._probe([shape]))
        error = self._shapes[shape]
        if error is not None:
            raise error

    def warmup(self, shapes: Sequence[Shape]) -> dict[str, float | None]:
        """Probe and warm up every input size not seen yet (allocations, kernels), seed the cost model with
        the switch, merged and mixed costs measured there, and return its estimates. A size the backbone
        refuses is recorded (its tasks are refused), not raised."""
        return self.call(lambda: self._probe([tuple(s) for s in shapes]))

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
        if self._shapes.get(tuple(task.shape), True) is not None:  # not known to be fine: probe (once per size)
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
                jobs = [_Job(task, entry, chunk, top_k, loop.create_future(), loop) for chunk in chunks]
                items = [WorkItem(task.key, task.weight_key, task.shape, j.x.shape[0], j) for j in jobs]
                self.scheduler.put(items)
                try:
                    results: list[_ChunkResult] = [await j.future for j in jobs]
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
            self._run_control()
            if self._broken:
                log.critical("live weights could not be restored: stopping the worker (liveness fails)")
                for item in self.scheduler.close():
                    self._answer(item.payload, InferenceFailed("the inference worker stopped"))
                break
            if self.scheduler.closed:
                break
            batch = self.scheduler.next_batch()
            if batch is None:
                continue
            try:
                self._serve(batch)
            except Exception:  # a bug after the answers: keep serving; the requesters time out (503)
                log.exception("unexpected error after a batch size=%d", batch.size)
        self._fail_control()
        log.info("engine stopped")

    def _run_control(self) -> None:
        while True:
            try:
                fn, future = self._control.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as e:  # reported to the caller, who decides what it means
                future.set_exception(e)

    def _fail_control(self) -> None:
        while True:
            try:
                _fn, future = self._control.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(ShuttingDown("the inference engine stopped"))

    def _serve(self, batch: Batch) -> None:
        items = [i for i in batch.items if not i.abandoned]
        if not items:
            return
        jobs: list[_Job] = [i.payload for i in items]
        start = time.perf_counter()
        started = self.scheduler.clock()
        try:
            with torch.no_grad():
                if batch.mode == "merged":
                    self._activate(jobs[0].task, jobs[0].entry)
                    forward_start = time.perf_counter()
                    feats = self._forward(torch.cat([j.x for j in jobs]))
                else:
                    self._activate(None, None)
                    forward_start = time.perf_counter()
                    feats = self._forward_mixed(jobs)
                predictions = self._heads(feats, jobs)
        except RepServeError as e:  # the batch's task cannot be served (its fold failed): its requests only
            for job in jobs:
                self._answer(job, e)
            return
        except Exception as e:
            self.metrics.engine_errors.inc()
            log.exception("batch failed mode=%s size=%d tasks=%s", batch.mode, batch.size,
                          sorted({j.task.name for j in jobs}))
            for job in jobs:
                self._answer(job, InferenceFailed(f"inference failed: {type(e).__name__}: {e}"))
            return
        end = time.perf_counter()
        size, tasks = sum(j.x.shape[0] for j in jobs), {j.task.key for j in jobs}
        if batch.mode == "merged" or any(j.entry.folds is not None for j in jobs):
            self.costs.observe_batch(batch.mode, jobs[0].task.shape, size, end - forward_start)
        m = self.metrics
        m.inference_duration.labels(mode=batch.mode).observe(end - start)
        m.batch_size.labels(mode=batch.mode).observe(size)
        m.batch_tasks.labels(mode=batch.mode).observe(len(tasks))
        for item, job, preds in zip(items, jobs, predictions, strict=True):
            waited = started - item.enqueued
            m.queue_duration.observe(waited)
            m.images.labels(task=job.task.name).inc(len(preds))
            self._answer(job, _ChunkResult(preds, waited, end - start, size, batch.mode))
        log.debug("batch mode=%s size=%d tasks=%d seconds=%.4f", batch.mode, size, len(tasks), end - start)

    @staticmethod
    def _answer(job: _Job, value: object) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
            job.loop.call_soon_threadsafe(_resolve, job.future, value)

    def _activate(self, task: TaskRef | None, entry: DeviceTask | None) -> None:
        """Make ``task``'s weights live (``None``: the base) unless they already are; a switch is timed into
        the metrics and the cost model."""
        start = time.perf_counter()
        try:
            switched = self.residency.activate(task, entry)
            self._sync()
        except BaseException:
            self._reset_weights()
            raise
        if not switched:
            return
        seconds = time.perf_counter() - start
        self.metrics.switches.inc()
        self.metrics.switch_duration.observe(seconds)
        self.costs.observe_switch(seconds)

    def _reset_weights(self) -> None:
        """After a failed switch some targets may hold a mix of two tasks: restore EVERY target from the
        pristine copies (if even that fails, the worker stops and liveness fails)."""
        self._broken = True
        self.residency.reset()
        self._sync()
        self._broken = False
        log.warning("live weights restored to the base after a failed switch")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, F]`` in the serving dtype."""
        return self.backbone.model(x.to(self.device, self.dtype, non_blocking=True))

    def _forward_mixed(self, jobs: list[_Job]) -> Tensor:
        x = torch.cat([j.x for j in jobs])
        tasks: dict[tuple[str, int, int], int] = {}
        adapters: list[PackedFolds | None] = []
        rows: list[int] = []
        for job in jobs:
            if job.task.key not in tasks:
                tasks[job.task.key] = len(adapters)
                adapters.append(job.entry.folds)
            rows += [tasks[job.task.key]] * job.x.shape[0]
        if not any(adapters):
            return self._forward(x)  # only tasks without adapters: the plain base forward
        with mixed_batch(self.sites, adapters, torch.tensor(rows, dtype=torch.long, device=self.device)):
            return self._forward(x)

    @staticmethod
    def _heads(feats: Tensor, jobs: list[_Job]) -> list[list[list[Prediction]]]:
        """Per job, per image: top-k ``(label, score)`` of the job's own task head; softmax in float32."""
        out = []
        offset = 0
        for job in jobs:
            n, entry, labels = job.x.shape[0], job.entry, job.task.labels
            logits = torch.addmm(entry.head_bias, feats[offset:offset + n], entry.head_weight.t())  # [n, C]
            offset += n
            scores, index = logits.float().softmax(dim=-1).topk(min(job.top_k, len(labels)), dim=-1)
            out.append([[(labels[i], s) for i, s in zip(row_i, row_s, strict=True)]
                        for row_i, row_s in zip(index.tolist(), scores.tolist(), strict=True)])
        return out

    # ---- probes and warm-up (worker) ------------------------------------------------------------------

    def _probe(self, shapes: Sequence[Shape]) -> dict[str, float | None]:
        """Each new input size: a forward at batch 1 (refused sizes are recorded), then, with warm-up on,
        the timed paths of :meth:`_warmup_shape`."""
        new = [s for s in dict.fromkeys(shapes) if s not in self._shapes]
        synthetic = self._synthetic_task() if new and self.config.warmup else None
        with torch.no_grad():
            self._activate(None, None)  # probes run on the base weights; a failure here is not the size's
            for shape in new:
                try:
                    self._forward(torch.zeros(1, *shape))
                except Exception as e:
                    self._shapes[shape] = BundleError(
                        f"the backbone {self.backbone.arch} cannot take input size {shape}: {type(e).__name__}: {e}")
                    log.warning("input size refused shape=%s error=%s", shape, e)
                    continue
                if synthetic is not None:
                    self._warmup_shape(shape, synthetic)
                self._shapes[shape] = None
        if synthetic is not None:
            self.residency.forget([synthetic[0]])
        snapshot = self.costs.snapshot()
        if new and self.config.warmup:
            log.info("warm-up done shapes=%s costs=%s", new, snapshot)
        return snapshot

    def _synthetic_task(self) -> tuple[TaskRef, DeviceTask] | None:
        """A task with adapters on every site (zeros: the cost of an adapter does not depend on its values),
        built and folded through the residency like a served one, for timing; ``None`` without sites."""
        if not self.sites:
            return None
        bb, hidden = self.backbone, 8
        manifest = Manifest(name="warmup", labels=["warmup"], adapter=AdapterConfig(hidden=hidden, groups=1),
                            backbone=BackboneRef(arch=bb.arch, fingerprint=bb.fingerprint), preprocess=bb.preprocess)
        tensors = {"head.weight": torch.zeros(1, bb.num_features), "head.bias": torch.zeros(1)}
        for site in self.sites:
            for param, shape in (("weight_a", (hidden, site.dim)), ("bias_a", (hidden,)),
                                 ("weight_b", (site.dim, hidden)), ("bias_b", (site.dim,))):
                tensors[f"adapter.{site.name}.{param}"] = torch.zeros(shape)
        task = TaskRef(manifest)
        return task, self.residency.build(PackedBundle.from_tensors(manifest, tensors), fold=True)

    def _warmup_shape(self, shape: Shape, synthetic: tuple[TaskRef, DeviceTask]) -> None:
        """Base forwards at batch n (allocations, kernel choice); a switch there and back and a mixed
        forward, each timed into the cost model."""
        n = max(1, min(self.config.max_batch, 4))
        x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
        self.costs.observe_batch("merged", shape, n, _timed(lambda: self._forward(x), self._sync))
        task, entry = synthetic
        self._activate(task, entry)
        self._activate(None, None)
        rows = torch.arange(n, device=self.device) % 2
        with mixed_batch(self.sites, [entry.folds, None], rows):
            self._forward(x)
            self.costs.observe_batch("mixed", shape, n, _timed(lambda: self._forward(x), self._sync))


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start
