"""The baseline server of ``bench.serving``: one full model copy per task, as a server without RepServe holds
many fine-tuned classifiers.

At start-up every task of the store becomes its own model: a deep copy of the backbone with the task's
adapters folded in for good (by :class:`WeightSwitcher`, exactly what RepServe's merged path computes), a
plain fine-tuned timm model with no slots or hooks, plus its head. Requests are decoded and preprocessed exactly as
RepServe does (:func:`repadapter.decode_image`, :func:`repadapter.build_transform` of the task's
manifest) in a worker thread, then served by ONE inference thread (like RepServe's single engine worker)
with the simplest batching a per-task-model server can do: take the oldest waiting request and every other
waiting request *of the same task*, up to ``--max-batch`` images, with no fill delay (``--max-batch 1``:
per-request forwards). A copy can only batch its own task's requests; that is the difference measured.

    python -m bench.serving_baseline --store DIR --port 8000 [--backbone embedded] [--threads 1]

Routes: ``POST /classify?task=NAME&top_k=5`` (raw ``image/*`` body or multipart ``files``; the response
has RepServe's ``results``, ``batch_sizes``, ``modes`` and ``timings`` fields) and ``GET /readyz``.
Loopback only by default; not a product, only the other side of a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image
from torch import Tensor, nn

from repadapter import LocalStore, PreprocessConfig, WeightSwitcher, attach_slots, build_transform, decode_image
from repadapter.errors import RepServeError

log = logging.getLogger("bench.serving_baseline")


@dataclass
class TaskModel:
    """One task's own model: backbone copy with the task folded in, its head ``[C, F]``/``[C]``, labels."""

    model: nn.Module
    head_weight: Tensor
    head_bias: Tensor
    labels: list[str]
    preprocess: PreprocessConfig


def load_models(store: Path, backbone: str, *, device: str, dtype: torch.dtype, seed: int) -> dict[str, TaskModel]:
    """Every task of ``store`` as a separate plain model on ``device``: a deep copy of the backbone holding
    the task's merged weights (folded on a scratch copy with slots, then loaded into the plain copy, so the
    copies carry no slots, hooks or pristine weights). Bundles are checked as RepServe checks them."""
    from repadapter import load_backbone

    base = load_backbone(backbone, device=device, dtype=dtype, seed=seed)
    scratch = copy.deepcopy(base.model)
    sites = attach_slots(scratch, "block")
    switcher = WeightSwitcher(sites)
    tasks = LocalStore(store)
    models: dict[str, TaskModel] = {}
    for entry in tasks.list():
        bundle = tasks.get(entry.name, entry.version)
        bundle.check_compatible(base.arch, base.fingerprint, sites, base.num_features)
        adapters = {k: w.to(device=device, dtype=torch.float32) for k, w in bundle.adapters.items()}
        switcher.activate(switcher.prepare(bundle.name, adapters) if adapters else None)
        model = copy.deepcopy(base.model)
        model.load_state_dict(scratch.state_dict())  # empty slots hold no state: the keys are the plain model's
        models[bundle.name] = TaskModel(model.eval(), bundle.head_weight.to(device, dtype),
                                        bundle.head_bias.to(device, dtype), list(bundle.manifest.labels),
                                        bundle.manifest.preprocess)
    return models


@dataclass(eq=False)
class _Pending:
    task: str
    x: Tensor  # [n, 3, H, W] float32, CPU
    top_k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


class Worker:
    """The one inference thread: greedy per-task batches (module docstring). Thread-safe ``submit``."""

    def __init__(self, models: dict[str, TaskModel], *, max_batch: int, device: str, dtype: torch.dtype) -> None:
        self.models, self.max_batch, self.device, self.dtype = models, max_batch, device, dtype
        self._pending: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="baseline-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(10)

    async def submit(self, task: str, x: Tensor, top_k: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        job = _Pending(task, x, top_k, loop.create_future(), loop)
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return await job.future

    def _warmup(self) -> None:
        """One forward per model at its input size, batch 1 and ``max_batch`` (allocations, kernel choice),
        on the serving thread itself: torch's intra-op thread pool is per calling thread."""
        with torch.no_grad():
            for tm in self.models.values():
                for n in dict.fromkeys((1, self.max_batch)):
                    tm.model(torch.zeros(n, *tm.preprocess.input_size, device=self.device, dtype=self.dtype))

    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._pending.popleft()
            batch, room, kept = [first], self.max_batch - first.x.shape[0], deque()
            while self._pending:
                job = self._pending.popleft()
                if job.task == first.task and job.x.shape[0] <= room:
                    batch.append(job)
                    room -= job.x.shape[0]
                else:
                    kept.append(job)
            self._pending = kept
            return batch

    def _loop(self) -> None:
        try:
            self._warmup()
        except Exception:  # a server that cannot run its models must not look alive: exit, the log says why
            log.exception("warm-up failed")
            os._exit(1)
        self.ready.set()
        log.info("baseline ready tasks=%d max_batch=%d", len(self.models), self.max_batch)
        while (batch := self._take()) is not None:
            start = time.perf_counter()
            try:
                answers = self._serve(batch)
            except Exception as e:  # reported to every requester of the batch as a 500
                log.exception("batch failed task=%s", batch[0].task)
                answers = [e] * len(batch)
            seconds = time.perf_counter() - start
            size = sum(j.x.shape[0] for j in batch)
            for job, answer in zip(batch, answers, strict=True):
                if not isinstance(answer, BaseException):
                    answer = {"predictions": answer, "batch_size": size, "queue_s": start - job.enqueued,
                              "inference_s": seconds}
                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                    job.loop.call_soon_threadsafe(_resolve, job.future, answer)

    @torch.no_grad()
    def _serve(self, batch: list[_Pending]) -> list[list[list[tuple[str, float]]]]:
        tm = self.models[batch[0].task]
        feats = tm.model(torch.cat([j.x for j in batch]).to(self.device, self.dtype))  # [B, F]
        logits = torch.addmm(tm.head_bias, feats, tm.head_weight.t()).float()  # [B, C]
        out, offset = [], 0
        for job in batch:
            n = job.x.shape[0]
            scores, index = logits[offset:offset + n].softmax(-1).topk(min(job.top_k, len(tm.labels)), dim=-1)
            offset += n
            out.append([[(tm.labels[i], s) for i, s in zip(ri, rs, strict=True)]
                        for ri, rs in zip(index.tolist(), scores.tolist(), strict=True)])
        return out


def _resolve(future: asyncio.Future, value: object) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


@functools.lru_cache(maxsize=16)
def _transform(cfg: PreprocessConfig) -> Callable[[Image.Image], Tensor]:
    return build_transform(cfg)


def _preprocess(blobs: Sequence[bytes], cfg: PreprocessConfig) -> Tensor:
    """``[n, 3, H, W]`` float32: RepServe's decode (limits, EXIF, any mode) and the task's transform."""
    transform = _transform(cfg)
    return torch.stack([transform(decode_image(b)) for b in blobs])


def create_app(worker: Worker) -> FastAPI:
    """A FastAPI app with RepServe's ``/classify`` contract (the fields the load generator reads) and ``/readyz``."""
    app = FastAPI(title="one-model-per-task baseline")

    def error(status: int, code: str, detail: str) -> JSONResponse:
        return JSONResponse({"error": code, "detail": detail}, status_code=status)

    @app.get("/readyz", response_model=None)
    async def readyz() -> dict[str, Any] | JSONResponse:
        if not worker.ready.is_set():
            return error(503, "not_ready", "warming up")
        return {"ready": True, "tasks": len(worker.models)}

    @app.post("/classify", response_model=None)
    async def classify(request: Request, task: str, top_k: int = 5) -> dict[str, Any] | JSONResponse:
        start = time.perf_counter()
        tm = worker.models.get(task)
        if tm is None:
            return error(404, "task_not_found", f"no task {task!r}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            blobs = [await f.read() for f in form.getlist("files") if not isinstance(f, str)]
        else:
            blobs = [await request.body()]
        received = time.perf_counter()
        try:
            x = await run_in_threadpool(_preprocess, blobs, tm.preprocess)
        except RepServeError as e:
            return error(e.status_code, e.code, str(e))
        decoded = time.perf_counter()
        try:
            answer = await worker.submit(task, x, top_k)
        except Exception as e:
            return error(500, "inference_failed", f"{type(e).__name__}: {e}")
        return {
            "task": task,
            "results": [{"index": i, "predictions": [{"label": label, "score": s} for label, s in preds]}
                        for i, preds in enumerate(answer["predictions"])],
            "batch_sizes": [answer["batch_size"]],
            "modes": ["copy"],
            "timings": {"decode_ms": (decoded - received) * 1e3, "queue_ms": answer["queue_s"] * 1e3,
                        "inference_ms": answer["inference_s"] * 1e3,
                        "total_ms": (time.perf_counter() - start) * 1e3},
        }

    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="task store: every task becomes one model copy")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backbone", default="embedded", help="as RepServe's --backbone")
    p.add_argument("--seed", type=int, default=0, help="as RepServe's --seed (random-init backbones)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-batch", type=int, default=16, help="most images per forward (1: no batching)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    models = load_models(args.store, args.backbone, device=args.device, dtype=dtype, seed=args.seed)
    if not models:
        raise SystemExit(f"no tasks in {args.store}")
    worker = Worker(models, max_batch=args.max_batch, device=args.device, dtype=dtype)
    worker.start()  # warms up, then serves; /readyz answers 200 from then on
    import uvicorn

    try:
        uvicorn.run(create_app(worker), host=args.host, port=args.port, log_config=None, log_level=args.log_level)
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
