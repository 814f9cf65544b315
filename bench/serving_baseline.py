"""The baseline server of the serving benchmarks: one full fine-tuned model per task, as users serve many
fine-tuned classifiers without RepServe: an LRU of at most K models per process, a task's model loaded from
its own file on a miss (what Ray Serve model multiplexing and TorchServe's per-model workers do).

- Models: ``--models DIR`` holds ``<task>.safetensors`` per task (:func:`bench.taskgen.export_models`: the
  backbone with the task folded in, plus ``head.weight``/``head.bias``). A miss copies the file's tensors
  into the module of a model evicted earlier that no request uses any more (a new copy of the backbone only
  when there is none), in a loader thread, once per task however many requests wait for it, while the
  inference thread keeps serving the models it holds. That is stronger than what users deploy: Ray Serve's
  documented multiplexing constructs and loads a new model per miss, on the replica's own event loop
  (``--no-reuse-modules``: a new model, a deep copy of the backbone, per miss).
- Cache: ``--cache-models K`` (0: no bound); ``--preload`` loads every task at start (the
  one-model-copy-per-task server of ``bench.serving``).
- Requests are decoded and preprocessed exactly as RepServe does (:func:`repadapter.preprocess.preprocess_batch`
  with the task's manifest, read from ``--store``) in a worker thread,
  then served by ONE inference thread (like RepServe's single engine worker) with the simplest batching a
  per-task-model server can do: the oldest waiting request and every other waiting request *of the same
  task*, up to ``--max-batch`` images, with no fill delay (``--max-batch 1``: per-request forwards).

    python -m bench.serving_baseline --store DIR --models DIR --port 8000 [--cache-models 50] [--threads 1]

Routes: ``POST /classify?task=NAME&top_k=5`` (raw ``image/*`` body or multipart ``files``; the response
has RepServe's ``results``, ``batch_sizes``, ``modes`` and ``timings`` fields) and ``GET /readyz`` (with
the cache's loads, hits and misses). Loopback only by default; not a product, only the other side of a
measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import copy
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from safetensors.torch import load_file
from torch import Tensor, nn

from repadapter import LocalStore, Manifest, load_backbone
from repadapter.errors import RepServeError
from repadapter.predict import Prediction, top_k
from repadapter.preprocess import preprocess_batch

# The baseline answers like RepServe by construction: its error codes and its worker-to-request hand-off
# are the service's own (public, stable pieces of it, not the engine's internals).
from service.errors import http_status
from service.handoff import resolve_soon

log = logging.getLogger("bench.serving_baseline")


@dataclass(eq=False)
class TaskModel:
    """One task's own model: the backbone with the task folded in, and its head ``[C, F]``/``[C]``.
    ``users``: requests queued or running with it (its module is reused only once that is 0)."""

    task: str
    model: nn.Module
    head_weight: Tensor
    head_bias: Tensor
    users: int = 0
    cached: bool = True


class ModelCache:
    """An LRU of at most ``capacity`` task models (0: unbounded), loaded from ``models/<task>.safetensors`` in
    loader threads, one load per task at a time. A load copies the file's tensors into the module of a model
    evicted earlier and no longer in use (else a new copy of the backbone): the cheapest a per-task-model
    server can make a miss. Thread-safe; :meth:`acquire` / :meth:`release` bracket every use of a model."""

    def __init__(self, template: nn.Module, models: Path, *, capacity: int, device: str, dtype: torch.dtype,
                 reuse_modules: bool = True, loader_threads: int = 2) -> None:
        self.template = copy.deepcopy(template).to(device, dtype).eval()
        self.reuse_modules = reuse_modules
        self.models, self.capacity, self.device, self.dtype = models, capacity, device, dtype
        self._cache: OrderedDict[str, TaskModel] = OrderedDict()
        self._free: list[nn.Module] = []  # modules of evicted models nobody uses any more
        self._inflight: dict[str, concurrent.futures.Future[TaskModel]] = {}
        self._waiting: dict[str, int] = {}  # requests waiting for a load: its users from the moment it is done
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(loader_threads, thread_name_prefix="baseline-loader")
        self.loads = self.hits = self.misses = self.evictions = self.new_modules = 0
        self.load_seconds = 0.0

    def load(self, task: str) -> TaskModel:
        """Read the task's file into a free module (any thread); not cached yet."""
        start = time.perf_counter()
        state = load_file(str(self.models / f"{task}.safetensors"), device=self.device)
        head_weight, head_bias = state.pop("head.weight"), state.pop("head.bias")
        with self._lock:
            module = self._free.pop() if self._free else None
        if module is None:
            module = copy.deepcopy(self.template)
            self.new_modules += 1
        with torch.no_grad():
            module.load_state_dict(state)
        tm = TaskModel(task, module, head_weight.to(self.dtype), head_bias.to(self.dtype), cached=False)
        with self._lock:
            self.loads += 1
            self.load_seconds += time.perf_counter() - start
        return tm

    async def acquire(self, task: str) -> TaskModel:
        """The task's model, held for one use (loaded first on a miss, shared by concurrent misses)."""
        with self._lock:
            tm = self._cache.get(task)
            if tm is not None:
                self.hits += 1
                self._cache.move_to_end(task)
                tm.users += 1
                return tm
            self.misses += 1
            self._waiting[task] = self._waiting.get(task, 0) + 1
            future = self._inflight.get(task)
            if future is None:
                future = self._pool.submit(self._load_and_keep, task)
                self._inflight[task] = future
        return await asyncio.shield(asyncio.wrap_future(future))

    def release(self, tm: TaskModel) -> None:
        with self._lock:
            tm.users -= 1
            if tm.users == 0 and not tm.cached and self.reuse_modules:
                self._free.append(tm.model)

    def _load_and_keep(self, task: str) -> TaskModel:
        try:
            tm = self.load(task)
        except BaseException:
            with self._lock:
                self._inflight.pop(task, None)
                self._waiting.pop(task, None)
            raise
        with self._lock:  # the waiters become users before the model can be evicted
            tm.users += self._waiting.pop(task, 0)
            self._inflight.pop(task, None)
            self._keep(tm)
        return tm

    def put(self, tm: TaskModel) -> None:
        with self._lock:
            self._keep(tm)

    def _keep(self, tm: TaskModel) -> None:
        tm.cached = True
        self._cache[tm.task] = tm
        self._cache.move_to_end(tm.task)
        while self.capacity and len(self._cache) > self.capacity:
            _, old = self._cache.popitem(last=False)
            old.cached = False
            self.evictions += 1
            if old.users == 0 and self.reuse_modules:
                self._free.append(old.model)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"cached": len(self._cache), "capacity": self.capacity, "loads": self.loads, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions, "modules": self.new_modules,
                    "load_seconds": self.load_seconds}


@dataclass(eq=False)
class _Pending:
    task: str
    tm: TaskModel
    x: Tensor  # [n, 3, H, W] float32, CPU
    top_k: int
    labels: list[str]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


class Worker:
    """The one inference thread: greedy per-task batches (module docstring). Thread-safe ``submit``."""

    def __init__(self, *, max_batch: int, device: str, dtype: torch.dtype) -> None:
        self.max_batch, self.device, self.dtype = max_batch, device, dtype
        self._pending: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="baseline-worker", daemon=True)

    def start(self, warmup: Callable[[], None]) -> None:
        self._warmup = warmup
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(10)

    async def submit(self, task: str, tm: TaskModel, x: Tensor, top_k: int, labels: list[str]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        job = _Pending(task, tm, x, top_k, labels, loop.create_future(), loop)
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return await job.future

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
                if job.tm is first.tm and job.x.shape[0] <= room:
                    batch.append(job)
                    room -= job.x.shape[0]
                else:
                    kept.append(job)
            self._pending = kept
            return batch

    def _loop(self) -> None:
        try:
            self._warmup()  # on this thread: torch's intra-op thread pool is per calling thread
        except Exception:  # a server that cannot run its models must not look alive: exit, the log says why
            log.exception("warm-up failed")
            os._exit(1)
        self.ready.set()
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
                resolve_soon(job.loop, job.future, answer)

    @torch.no_grad()
    def _serve(self, batch: list[_Pending]) -> list[list[list[Prediction]]]:
        tm = batch[0].tm
        feats = tm.model(torch.cat([j.x for j in batch]).to(self.device, self.dtype))  # [B, F]
        logits = torch.addmm(tm.head_bias, feats, tm.head_weight.t())  # [B, C]
        out, offset = [], 0
        for job in batch:
            n = job.x.shape[0]
            out.append(top_k(logits[offset:offset + n], job.labels, job.top_k))
            offset += n
        return out


def create_app(worker: Worker, cache: ModelCache, manifests: dict[str, Manifest]) -> FastAPI:
    """A FastAPI app with RepServe's ``/classify`` contract (the fields the load generator reads) and ``/readyz``."""
    app = FastAPI(title="one-model-per-task baseline")

    def error(status: int, code: str, detail: str) -> JSONResponse:
        return JSONResponse({"error": code, "detail": detail}, status_code=status)

    @app.get("/readyz", response_model=None)
    async def readyz() -> dict[str, Any] | JSONResponse:
        if not worker.ready.is_set():
            return error(503, "not_ready", "warming up")
        return {"ready": True, "tasks": len(manifests), **cache.stats()}

    @app.post("/classify", response_model=None)
    async def classify(request: Request, task: str, top_k: int = 5) -> dict[str, Any] | JSONResponse:
        start = time.perf_counter()
        manifest = manifests.get(task)
        if manifest is None:
            return error(404, "task_not_found", f"no task {task!r}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            blobs = [await f.read() for f in form.getlist("files") if not isinstance(f, str)]
        else:
            blobs = [await request.body()]
        received = time.perf_counter()
        try:
            x = await run_in_threadpool(preprocess_batch, blobs, manifest.preprocess)  # RepServe's decode
        except RepServeError as e:
            return error(http_status(type(e)), e.code, str(e))
        decoded = time.perf_counter()
        try:
            tm = await cache.acquire(task)
        except Exception as e:
            return error(500, "load_failed", f"{type(e).__name__}: {e}")
        loaded = time.perf_counter()
        try:
            answer = await worker.submit(task, tm, x, top_k, manifest.labels)
        except Exception as e:
            return error(500, "inference_failed", f"{type(e).__name__}: {e}")
        finally:
            cache.release(tm)
        return {
            "task": task,
            "results": [{"index": i, "predictions": [{"label": label, "score": s} for label, s in preds]}
                        for i, preds in enumerate(answer["predictions"])],
            "batch_sizes": [answer["batch_size"]],
            "modes": ["copy"],
            "timings": {"decode_ms": (decoded - received) * 1e3, "load_ms": (loaded - decoded) * 1e3,
                        "queue_ms": answer["queue_s"] * 1e3, "inference_ms": answer["inference_s"] * 1e3,
                        "total_ms": (time.perf_counter() - start) * 1e3},
        }

    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="task store: labels and preprocessing per task")
    p.add_argument("--models", type=Path, required=True, help="<task>.safetensors per task (bench.taskgen)")
    p.add_argument("--cache-models", type=int, default=0, help="most models held at once, LRU (0: no bound)")
    p.add_argument("--preload", action="store_true", help="load every task's model at start")
    p.add_argument("--reuse-modules", action=argparse.BooleanOptionalAction, default=True,
                   help="load a missed model into an evicted one's module (else build a new model per miss, as "
                   "Ray Serve's multiplexing does)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backbone", default="embedded", help="as RepServe's --backbone (the models' architecture)")
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
    store = LocalStore(args.store)
    manifests = {e.name: store.manifest(e.name, e.version) for e in store.list()}
    if not manifests:
        raise SystemExit(f"no tasks in {args.store}")
    base = load_backbone(args.backbone, device="cpu", seed=args.seed)
    cache = ModelCache(base.model, args.models, capacity=args.cache_models, device=args.device, dtype=dtype,
                       reuse_modules=args.reuse_modules)
    if args.preload:
        for task in manifests:
            cache.put(cache.load(task))
    worker = Worker(max_batch=args.max_batch, device=args.device, dtype=dtype)

    def warmup() -> None:
        """One forward per input size, batch 1 and ``max_batch`` (allocations, kernel choice)."""
        with torch.no_grad():
            for shape in {m.preprocess.input_size for m in manifests.values()}:
                for n in dict.fromkeys((1, args.max_batch)):
                    cache.template(torch.zeros(n, *shape, device=args.device, dtype=dtype))

    worker.start(warmup)  # warms up, then serves; /readyz answers 200 from then on
    log.info("baseline tasks=%d cache_models=%d preload=%s", len(manifests), args.cache_models, args.preload)
    import uvicorn

    try:
        uvicorn.run(create_app(worker, cache, manifests), host=args.host, port=args.port, log_config=None,
                    log_level=args.log_level)
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
