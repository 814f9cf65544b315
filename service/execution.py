"""Running one batch on the model: make its weights live, forward, each request's head, top-k, answers.

Only the engine's worker calls :class:`BatchExecutor` (it mutates the live weights). Per batch it either makes
the batch's weights live (``merged``: one adapter task, or tasks without adapters on the base weights) or
restores the base and runs ``mixed_batch`` (per-row adapters of several tasks). Then each request's rows
go through its own task's head (serving dtype), softmax in float32, top-k. Switches and forwards are timed
into the metrics and the cost model that ``auto`` decides on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from repadapter import Backbone, mixed_batch
from repadapter.errors import RepServeError
from repadapter.inject import Site
from repadapter.mixed import PackedFolds
from repadapter.predict import Prediction, top_k

from .batcher import Batch, Mode
from .errors import InferenceFailed
from .handoff import resolve_soon
from .metrics import Metrics
from .policy import CostModel
from .registry import TaskRef
from .residency import DeviceTask, Residency

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """Payload of one queued chunk: the task version it was accepted for, that task on the device (held
    here, so evicting it from the device tier cannot pull it from under a queued request), its rows, and
    where its answer goes."""

    task: TaskRef
    entry: DeviceTask
    x: Tensor  # [n, 3, H, W] float32, CPU
    top_k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def answer(self, value: object) -> None:
        """Resolve the requester's future (a :class:`ChunkResult` or an exception), from the worker."""
        resolve_soon(self.loop, self.future, value)


@dataclass(frozen=True)
class ChunkResult:
    """One job's answer: top-k per image and how the batch that served it went."""

    predictions: list[list[Prediction]]
    queue_s: float
    inference_s: float
    batch_size: int
    mode: Mode


class BatchExecutor:
    """The model's forward passes and its live weights (through the residency), for the engine's worker."""

    def __init__(self, backbone: Backbone, sites: list[Site], residency: Residency, *, metrics: Metrics,
                 costs: CostModel) -> None:
        self.backbone, self.sites, self.residency = backbone, sites, residency
        self.metrics, self.costs = metrics, costs
        self.device, self.dtype = backbone.device, backbone.dtype
        self.broken = False  # live weights in an unknown state: never serve again

    def serve(self, batch: Batch, started: float) -> None:
        """Run ``batch`` (its items not abandoned) and answer each job; ``started`` is the scheduler's clock
        when the batch was taken (queue time = ``started - enqueued``). A failure is answered to the batch's
        requests only: a task that cannot be served its :class:`RepServeError`, anything else 500."""
        items = [i for i in batch.items if not i.abandoned]
        if not items:
            return
        jobs: list[Job] = [i.payload for i in items]
        start = time.perf_counter()
        try:
            with torch.no_grad():
                if batch.mode == "merged":
                    self.activate(jobs[0].task, jobs[0].entry)
                    forward_start = time.perf_counter()
                    feats = self.forward(torch.cat([j.x for j in jobs]))
                else:
                    self.activate(None, None)
                    forward_start = time.perf_counter()
                    feats = self._forward_mixed(jobs)
                predictions = self._heads(feats, jobs)
        except RepServeError as e:  # the batch's task cannot be served (its fold failed): its requests only
            for job in jobs:
                job.answer(e)
            return
        except Exception as e:
            self.metrics.engine_errors.inc()
            log.exception("batch failed mode=%s size=%d tasks=%s", batch.mode, batch.size,
                          sorted({j.task.name for j in jobs}))
            for job in jobs:
                job.answer(InferenceFailed(f"inference failed: {type(e).__name__}: {e}"))
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
            job.answer(ChunkResult(preds, waited, end - start, size, batch.mode))
        log.debug("batch mode=%s size=%d tasks=%d seconds=%.4f", batch.mode, size, len(tasks), end - start)

    def activate(self, task: TaskRef | None, entry: DeviceTask | None) -> None:
        """Make ``task``'s weights live (``None``: the base) unless they already are; a switch is timed into
        the metrics and the cost model."""
        start = time.perf_counter()
        try:
            switched = self.residency.activate(task, entry)
            self.sync()
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
        pristine copies (if even that fails, :attr:`broken` stays set: the worker stops, liveness fails)."""
        self.broken = True
        self.residency.reset()
        self.sync()
        self.broken = False
        log.warning("live weights restored to the base after a failed switch")

    def sync(self) -> None:
        """Wait for the device's queued kernels (CUDA), so a timing covers the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> float:
        """Seconds ``fn`` takes on the device (synchronised after it)."""
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, F]`` in the serving dtype."""
        return self.backbone.model(x.to(self.device, self.dtype, non_blocking=True))

    def _forward_mixed(self, jobs: list[Job]) -> Tensor:
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
            return self.forward(x)  # only tasks without adapters: the plain base forward
        with mixed_batch(self.sites, adapters, torch.tensor(rows, dtype=torch.long, device=self.device)):
            return self.forward(x)

    @staticmethod
    def _heads(feats: Tensor, jobs: list[Job]) -> list[list[list[Prediction]]]:
        """Per job, per image: top-k ``(label, score)`` of the job's own task head."""
        out = []
        offset = 0
        for job in jobs:
            n, entry = job.x.shape[0], job.entry
            logits = torch.addmm(entry.head_bias, feats[offset:offset + n], entry.head_weight.t())  # [n, C]
            offset += n
            out.append(top_k(logits, job.task.labels, job.top_k))
        return out
