"""The Open Inference Protocol (KServe v2, Triton's HTTP API) over the served tasks: each task is a model.

HTTP only: the wire format is :mod:`service.oip`, inference the classify path (:func:`.classify.classify_batch`),
so /v2 and /classify share decoding, image limits, the request deadline, disconnect handling and auth (the
classify token). Errors are the protocol's ``{"error": message}`` (:func:`service.errors.error_body` shapes
them for /v2 paths, in the app's handlers and in the middleware's 408). Health answers as /healthz and /readyz do:
200 with an empty body, 503 when not live or not ready (the protocol says 4xx; clients test for 200, and a 503
tells a proxy to retry elsewhere). A model is ready when its task is served: a task not on the device is loaded by
its first request. An inference body is bounded by what the task's most images can need (413 before parsing), and
is parsed in a worker thread under /classify's decode slots, within the request's deadline.
"""

# No `from __future__ import annotations`: FastAPI must see the closures' dependency types (_model_routes).

import asyncio
import base64
import threading
from collections.abc import Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from repadapter.errors import ImageError, TaskNotFound

from .. import __version__, oip
from ..deps import ReadyRuntime, require_reader
from ..errors import PROTOCOL_PREFIX, ClientClosed
from ..images import Deadline, decode_slots
from ..lifecycle import Runtime
from ..registry import TaskRef
from ..uploads import read_body
from .classify import classify_batch
from .health import healthz, readyz

router = APIRouter(prefix=PROTOCOL_PREFIX, tags=["v2"])

_TASK = Annotated[str, Path(description="The task's name (GET /tasks lists them).", examples=["imagenet"])]
_VERSION = Annotated[str, Path(description="The task's version: only the current one is served (0: a builtin).",
                                examples=["1", "0"])]
_ERROR = {"model": oip.ProtocolError}
# "4XX": every client error has the protocol's body (request validation is never FastAPI's 422 here)
_READ_ERRORS: dict[int | str, dict[str, Any]] = {code: _ERROR for code in (401, 403, 404, 503, "4XX")}
_EMPTY = {"description": "Yes (empty body).", "content": None}
_TINY_PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478da63f8cfc0f01f0005"
    "0002ff9e5f6a0d0000000049454e44ae426082")).decode()
_INFER_BODY = {
    "requestBody": {"required": True, "description": "The protocol's inference request as JSON. With Triton's "
                    f"binary tensor data extension the body is this JSON, `{oip.HEADER_LENGTH}` (a header) bytes "
                    "long, then the inputs' `binary_data_size` bytes (what tritonclient sends by default).",
                    "content": {
        "application/json": {
            "schema": oip.request_schema(),
            "example": {"inputs": [{"name": oip.IMAGE_BYTES, "shape": [1], "datatype": "BYTES",
                                    "data": [_TINY_PNG]}],
                        "parameters": {"top_k": 3}},
        },
    }},
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": oip.InferenceResponse, "description": "The outputs; with binary outputs, the JSON header "
          f"(`{oip.HEADER_LENGTH}` bytes) then their data.",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    400: _ERROR, 413: _ERROR, **_READ_ERRORS,
}


@router.get("", response_model=oip.ServerMetadata)
async def server_metadata() -> oip.ServerMetadata:
    """The server's name, version and protocol extensions."""
    return oip.ServerMetadata(name="repserve", version=__version__, extensions=oip.EXTENSIONS)


@router.get("/health/live", response_class=Response, responses={200: _EMPTY, 503: _ERROR})
def server_live(request: Request) -> Response:
    """Live as ``/healthz``: serving HTTP, start-up did not fail, the inference worker runs."""
    healthz(request)
    return Response()


@router.get("/health/ready", response_class=Response, responses={200: _EMPTY, 503: _ERROR})
def server_ready(request: Request) -> Response:
    """Ready as ``/readyz``: every task is served and warm-up is done."""
    readyz(request)
    return Response()


async def current_task(runtime: ReadyRuntime, name: _TASK) -> TaskRef:
    """The task ``name`` as served now (404 when it is not). Async, as every dependency (see service.deps)."""
    return runtime.registry.get(name)


async def task_version(runtime: ReadyRuntime, name: _TASK, version: _VERSION) -> TaskRef:
    """The task ``name`` at ``version``, which must be the one served now (404 for any other)."""
    task = runtime.registry.get(name)
    if version != str(task.version):
        raise TaskNotFound(f"task {name!r} has no version {version!r}; version {task.version} is served")
    return task


def _model_routes(path: str, served: Callable[..., TaskRef]) -> None:
    """The model's metadata, readiness and inference at ``path``, for the task ``served`` picks."""
    Served = Annotated[TaskRef, Depends(served)]

    @router.get(path, response_model=oip.ModelMetadata, responses=_READ_ERRORS, dependencies=[Depends(require_reader)])
    async def model_metadata(task: Served) -> oip.ModelMetadata:
        """The model's inputs (alternatives: send one) and outputs, with datatypes and shapes."""
        return oip.model_metadata(task)

    @router.get(f"{path}/ready", response_class=Response, responses={200: _EMPTY, **_READ_ERRORS},
                dependencies=[Depends(require_reader)])
    async def model_ready(_task: Served) -> Response:
        """Ready when served (404 when not); a task not on the device is loaded by its first request."""
        return Response()

    @router.post(f"{path}/infer", response_class=Response, responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY,
                 dependencies=[Depends(require_reader)])
    async def model_infer(request: Request, runtime: ReadyRuntime, task: Served) -> Response:
        """Class probabilities and top-k labels of images, as a preprocessed FP32 tensor or encoded files."""
        return await _infer(request, runtime, task)


_model_routes("/models/{name}", current_task)
_model_routes("/models/{name}/versions/{version}", task_version)


async def _infer(request: Request, runtime: Runtime, task: TaskRef) -> Response:
    s = runtime.settings
    deadline = Deadline.after(s.request_timeout_s)
    limits = oip.BodyLimits.of(task.shape, s.max_images_per_request, s.max_image_bytes)
    body = await deadline.run(read_body(request, limits.body), "reading the request body")
    json_size = oip.header_length(request.headers.get(oip.HEADER_LENGTH), len(body))
    limits.check(body, json_size)  # 413 before any parsing
    parsed = await _parse(request, body, json_size, task, deadline,
                          decode_slots(request.app.state, s.decode_concurrency))
    try:
        done = await classify_batch(request, runtime, task, parsed.images, oip.predictions_needed(parsed, task),
                                    deadline)
    except ImageError as e:
        raise oip.image_error(e) from e
    content, header = oip.encode_response(task, parsed, done.inference.predictions)
    if header is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={oip.HEADER_LENGTH: str(header)})


async def _parse(request: Request, body: bytes, json_size: int, task: TaskRef, deadline: Deadline,
                 slots: anyio.CapacityLimiter) -> oip.ParsedRequest:
    """:func:`oip.parse_request` in a worker thread once one of ``slots`` (/classify's decode slots) is free: a
    parse holds as much memory as a decode. Waiting for a slot ends at the deadline or when the client leaves;
    the thread is never abandoned (it would keep its memory while another takes its slot): it checks both
    itself and stops at its next step."""
    gone = threading.Event()

    def check() -> None:
        if gone.is_set():
            raise ClientClosed("the client disconnected before its answer; its request was not parsed")
        deadline.check("parsing the request body")

    async def parse() -> oip.ParsedRequest:
        await deadline.run(slots.acquire(), "waiting to parse: every decode slot is busy; the server is overloaded")
        try:
            return await anyio.to_thread.run_sync(oip.parse_request, body, json_size, task.shape, check)
        finally:
            slots.release()

    async def disconnected() -> None:  # the body has been read: the next message can only be a disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job, watcher = asyncio.ensure_future(parse()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also on cancellation from outside
        gone.set()  # first: cancelling waits for a running thread, which now stops at its next step
        for f in (job, watcher):
            if not f.done():
                f.cancel()
        await asyncio.gather(job, watcher, return_exceptions=True)
    if not job.cancelled():  # parsed, or refused (400, the deadline, the client gone while it ran)
        return job.result()
    raise ClientClosed("the client disconnected before its answer; its request was not parsed")
