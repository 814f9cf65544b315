"""Service-level errors, in the core's hierarchy so one exception handler maps every error to HTTP.

Client mistakes are 4xx with a message naming what is wrong; 503s are temporary (retry elsewhere or
later); the only 500 is a failure inside the engine, which no input can cause.
"""

from __future__ import annotations

import math
from typing import ClassVar

from repadapter.errors import RepServeError

RETRY = {"Retry-After": "1"}


class Unauthorized(RepServeError):
    """No bearer token where one is required."""

    code = "unauthorized"
    status_code = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class Forbidden(RepServeError):
    """A bearer token that is not the configured one."""

    code = "forbidden"
    status_code = 403


class MalformedRequest(RepServeError):
    """The request is syntactically wrong (missing field, bad multipart body, bad archive layout)."""

    code = "malformed_request"
    status_code = 422


class BuiltinTask(RepServeError):
    """The backbone's own classifier is served without a store entry, so it cannot be deleted."""

    code = "task_builtin"
    status_code = 409


class NotReady(RepServeError):
    """The service is still loading tasks or warming up (see /readyz)."""

    code = "not_ready"
    status_code = 503
    headers: ClassVar[dict[str, str]] = RETRY


class QueueFull(RepServeError):
    """Backpressure: too many images are waiting; retry later or on another replica."""

    code = "queue_full"
    status_code = 503
    headers: ClassVar[dict[str, str]] = RETRY


class InferenceTimeout(RepServeError):
    """The request was not answered within ``request_timeout_s``."""

    code = "timeout"
    status_code = 503
    headers: ClassVar[dict[str, str]] = RETRY


class ShuttingDown(RepServeError):
    """The engine stopped before the request was served."""

    code = "shutting_down"
    status_code = 503
    headers: ClassVar[dict[str, str]] = RETRY


class TaskUnavailable(RepServeError):
    """A listed task cannot be served: its stored bundle failed its checks when first loaded (until the store
    holds a new version of it), or the store could not be read (then with ``Retry-After``)."""

    code = "task_unavailable"
    status_code = 503

    def __init__(self, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.headers = {} if retry_after_s is None else {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class InferenceFailed(RepServeError):
    """The engine failed on a batch: a server bug or device failure, never bad input."""

    code = "inference_failed"
    status_code = 500


class Unhealthy(RepServeError):
    """Liveness failed: start-up failed or the inference worker died; the replica should be restarted."""

    code = "unhealthy"
    status_code = 503


class ClientClosed(RepServeError):
    """The client disconnected before its answer: its queued images were dropped unprocessed (nginx's 499;
    nobody receives this response, it names the outcome in logs and metrics)."""

    code = "client_closed_request"
    status_code = 499
