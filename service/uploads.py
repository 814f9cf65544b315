"""Reading request bodies with limits: multipart file fields and raw bodies (HTTP only, no tensors).

Limits are enforced while reading where possible (``Content-Length`` first, then streamed byte counts),
and every parse failure becomes a 413/415/422 with a message, never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from repadapter.errors import PayloadTooLarge

from .errors import MalformedRequest

_MULTIPART_OVERHEAD = 1 << 20  # headers and boundaries on top of the files themselves


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its bytes and, for multipart uploads, the client's file name."""

    data: bytes
    filename: str | None = None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def check_content_length(request: Request, limit: int) -> None:
    """Refuse (413) a body whose declared length exceeds ``limit`` before reading any of it."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise MalformedRequest(f"invalid Content-Length {declared!r}") from None
    if size > limit:
        raise PayloadTooLarge(f"the request body is {size} bytes, the limit is {limit}")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, streamed and cut off (413) past ``limit`` bytes (chunked bodies included)."""
    check_content_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_files(request: Request, fields: tuple[str, ...], *, max_files: int,
                     file_limit: int) -> dict[str, list[Upload]]:
    """File uploads of a multipart body, by field name (only ``fields``; other fields are refused).

    Each file is limited to ``file_limit`` bytes (413), the number of files to ``max_files`` (413).
    """
    check_content_length(request, max_files * file_limit + _MULTIPART_OVERHEAD)
    try:
        form = await request.form(max_files=max_files, max_fields=len(fields) + 4)
    except HTTPException as e:  # Starlette's wrapper of python-multipart errors
        if "Too many files" in str(e.detail):
            raise PayloadTooLarge(f"at most {max_files} files per request") from None
        raise MalformedRequest(f"malformed multipart body: {e.detail}") from None
    out: dict[str, list[Upload]] = {}
    try:
        for key, value in form.multi_items():
            if key not in fields:
                raise MalformedRequest(f"unexpected form field {key!r}; expected {', '.join(fields)}")
            if not isinstance(value, UploadFile):
                raise MalformedRequest(f"form field {key!r} must be a file upload (with a filename)")
            if value.size is not None and value.size > file_limit:
                raise PayloadTooLarge(f"{key} file {value.filename!r} is {value.size} bytes, "
                                      f"the limit is {file_limit}")
            out.setdefault(key, []).append(Upload(await value.read(), value.filename))
    finally:
        await form.close()
    return out
