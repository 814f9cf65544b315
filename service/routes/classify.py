"""POST /classify: HTTP in, engine call, HTTP out. No tensors are touched here: decoding and
preprocessing run in a worker thread, inference on the engine's worker.

One deadline, ``request_timeout_s`` from the request's start, covers reading the body, decoding and
inference: past it the answer is 503 ``timeout`` (with ``Retry-After``), whatever stage it was in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, TypeVar

import torch
from fastapi import APIRouter, Depends, Query, Request

from repadapter.errors import ImageError, PayloadTooLarge

from ..deps import ReadyRuntime, require_reader
from ..errors import ClientClosed, MalformedRequest
from ..images import Deadline, ImageLimits, decode_slots, preprocess_async
from ..lifecycle import Runtime
from ..registry import TaskRef
from ..schemas import ClassifyResponse, ErrorBody, ImageResult, Prediction, Timings
from ..settings import Settings
from ..uploads import Upload, media_type, read_body, read_files

if TYPE_CHECKING:
    from ..engine import Inference

router = APIRouter(tags=["classify"])
T = TypeVar("T")

_ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 413, 415, 422, 500, 503)}
_BODY = {
    "requestBody": {
        "required": True,
        "description": "Images as multipart `files` (one or more), or one image as the raw body.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            }},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _uploads(request: Request, s: Settings) -> list[Upload]:
    kind = media_type(request)
    if kind == "multipart/form-data":
        files = await read_files(request, ("files",), max_files=s.max_images_per_request,
                                 file_limit=s.max_image_bytes)
        if not files.get("files"):
            raise MalformedRequest("the multipart body has no `files`; send each image as a `files` part")
        return files["files"]
    if kind.startswith("image/") or kind == "application/octet-stream":
        return [Upload(await read_body(request, s.max_image_bytes))]
    raise ImageError(f"send images as multipart/form-data `files` or one image with Content-Type image/*; "
                     f"got {kind or 'no Content-Type'}")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first: then ``work`` is cancelled, which drops its queued
    images unprocessed (the engine skips abandoned items), and :class:`ClientClosed` is raised. The body has
    been read by now, so the next ASGI message can only be ``http.disconnect``."""
    job = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also on cancellation from outside (the request deadline)
        for f in (job, watcher):
            if not f.done():
                f.cancel()
        await asyncio.gather(job, watcher, return_exceptions=True)
    if not job.cancelled():  # finished first (or together with the disconnect): its answer or its error
        return job.result()
    raise ClientClosed("the client disconnected before its answer; its images were not processed")


@dataclass(frozen=True)
class Classified:
    """What :func:`classify_batch` answers: the engine's answer and the time spent decoding."""

    inference: Inference
    decode_s: float


async def classify_batch(request: Request, runtime: Runtime, task: TaskRef, images: Sequence[Upload] | torch.Tensor,
                         top_k: int, deadline: Deadline) -> Classified:
    """The classify path shared by every API (/classify, the v2 protocol): the per-request image count, decoding
    (encoded ``images``; a tensor is already preprocessed at the task's input size), then inference, all within
    ``deadline`` and dropped when the client disconnects."""
    s = runtime.settings
    if len(images) > s.max_images_per_request:
        raise PayloadTooLarge(f"{len(images)} images; at most {s.max_images_per_request} per request")
    start = time.perf_counter()
    if isinstance(images, torch.Tensor):
        x = images
    else:
        x = await preprocess_async(images, task.manifest.preprocess,
                                   ImageLimits(s.max_image_bytes, s.max_image_pixels, s.max_image_aspect), deadline,
                                   decode_slots(request.app.state, s.decode_concurrency))
    decode_s = time.perf_counter() - start
    result = await deadline.run(unless_disconnected(request, runtime.engine.submit(task, x, top_k)),
                                "loading the task or waiting for inference; the server is overloaded")
    return Classified(result, decode_s)


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_BODY,
             dependencies=[Depends(require_reader)])
async def classify(
    request: Request,
    runtime: ReadyRuntime,
    task: Annotated[str, Query(description="Name of the task to classify with (see GET /tasks).")],
    top_k: Annotated[int, Query(ge=1, le=1000, description="Labels per image (capped at the task's)")] = 5,
) -> ClassifyResponse:
    """Top-k labels for each image, by the task version current when the request was accepted."""
    start = time.perf_counter()
    deadline = Deadline.after(runtime.settings.request_timeout_s)
    loaded = runtime.registry.get(task)  # 404 before reading the body
    uploads = await deadline.run(_uploads(request, runtime.settings), "reading the request body")
    done = await classify_batch(request, runtime, loaded, uploads, top_k, deadline)
    result = done.inference
    return ClassifyResponse(
        task=loaded.name,
        task_version=loaded.version,
        results=[ImageResult(index=i, filename=up.filename,
                             predictions=[Prediction(label=label, score=score) for label, score in preds])
                 for i, (up, preds) in enumerate(zip(uploads, result.predictions, strict=True))],
        batch_sizes=result.batch_sizes,
        modes=result.modes,
        timings=Timings(decode_ms=done.decode_s * 1e3, load_ms=result.load_s * 1e3,
                        queue_ms=result.queue_s * 1e3, inference_ms=result.inference_s * 1e3,
                        total_ms=(time.perf_counter() - start) * 1e3),
    )
