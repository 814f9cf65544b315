"""Task management: register (POST), list and describe (GET), delete (DELETE).

A registered task is validated completely, written to the store atomically and served at once (already
resident); a replaced task serves new requests with its new version while queued ones finish with the old.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from repadapter.bundle import PackedBundle

from ..archive import read_bundle_archive
from ..deps import ReadyRuntime, require_admin, require_reader
from ..errors import MalformedRequest
from ..lifecycle import Runtime
from ..registry import TaskRef
from ..schemas import ErrorBody, TaskInfo, TaskList
from ..uploads import read_files

router = APIRouter(prefix="/tasks", tags=["tasks"])

_READ_ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 503)}
_WRITE_ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 422, 503, 507)}
_BODY = {
    "requestBody": {
        "required": True,
        "description": "`manifest` (manifest.json) and `tensors` (adapter.safetensors), or one `bundle` archive "
                       "(.zip, .tar, .tar.gz) holding both.",
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "properties": {name: {"type": "string", "format": "binary"} for name in ("manifest", "tensors", "bundle")},
        }}},
    }
}


def _register(runtime: Runtime, parts: dict[str, bytes], overwrite: bool) -> TaskRef:
    """Blocking part of a registration (archive, checksum, validation, store write), off the event loop."""
    limit = runtime.settings.max_bundle_bytes
    if "bundle" in parts:
        manifest, tensors = read_bundle_archive(parts["bundle"], limit=limit)
    else:
        manifest, tensors = parts["manifest"], parts["tensors"]
    return runtime.register(PackedBundle.deserialize(manifest, tensors), overwrite=overwrite)


@router.post("", status_code=201, response_model=TaskInfo, responses=_WRITE_ERRORS, openapi_extra=_BODY,
             dependencies=[Depends(require_admin)])
async def register_task(
    request: Request,
    response: Response,
    runtime: ReadyRuntime,
    overwrite: Annotated[bool, Query(description="Replace an existing task (as its next version).")] = False,
) -> TaskInfo:
    """Register a task bundle; it is validated before anything changes and served at once."""
    files = await read_files(request, ("manifest", "tensors", "bundle"), max_files=3,
                             file_limit=runtime.settings.max_bundle_bytes)
    if any(len(v) > 1 for v in files.values()):
        raise MalformedRequest("send each of manifest, tensors, bundle at most once")
    parts = {k: v[0].data for k, v in files.items()}
    if set(parts) not in ({"bundle"}, {"manifest", "tensors"}):
        raise MalformedRequest(f"send `manifest` and `tensors`, or one `bundle` archive; got {sorted(parts) or 'none'}")
    task = await run_in_threadpool(_register, runtime, parts, overwrite)
    response.headers["Location"] = f"/tasks/{task.name}"
    return TaskInfo.of(task, runtime.residency.tier(task), labels=True)


@router.get("", response_model=TaskList, responses=_READ_ERRORS, dependencies=[Depends(require_reader)])
def list_tasks(runtime: ReadyRuntime) -> TaskList:
    """Every served task (latest version), without labels."""
    return TaskList(tasks=[TaskInfo.of(t, runtime.residency.tier(t)) for t in runtime.registry.tasks()])


@router.get("/{name}", response_model=TaskInfo, responses=_READ_ERRORS, dependencies=[Depends(require_reader)])
def get_task(name: str, runtime: ReadyRuntime) -> TaskInfo:
    """One served task, with its labels."""
    task = runtime.registry.get(name)
    return TaskInfo.of(task, runtime.residency.tier(task), labels=True)


@router.delete("/{name}", status_code=204, response_class=Response, responses=_WRITE_ERRORS,
               dependencies=[Depends(require_admin)])
async def delete_task(
    name: str,
    runtime: ReadyRuntime,
    version: Annotated[int | None, Query(ge=1, description="Delete only if this version is the one served; "
                                         "otherwise 409 `version_mismatch` and nothing changes.")] = None,
) -> Response:
    """Delete a task from the store and stop serving it. Requests already accepted are still answered,
    by the version they were accepted for."""
    await run_in_threadpool(_delete, runtime, name, version)
    return Response(status_code=204)


def _delete(runtime: Runtime, name: str, version: int | None) -> None:
    """Blocking; with ``version``, checked and deleted under the registry's write lock (no registration between)."""
    if version is None:
        runtime.delete(name)
        return
    with runtime.registry.at_version(name, version):
        runtime.delete(name)
