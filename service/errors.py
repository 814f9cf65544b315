"""Service-level errors, and the one table that maps every error class (core and service) to HTTP.

The core (:mod:`repadapter.errors`) names its errors (``code``) and explains them; what they mean in HTTP
is the service's business, decided here only: :func:`http_status` and :func:`http_headers` are what the
app's exception handler (and anything else that answers with an error body) asks. Client mistakes are 4xx
with a message naming what is wrong; 503s are temporary (retry elsewhere or later); the only 500 is a
failure inside the engine, which no input can cause.
"""

from __future__ import annotations

import math

from repadapter.errors import (
    BackboneMismatch,
    BundleError,
    CheckpointError,
    ImageError,
    PayloadTooLarge,
    RepServeError,
    StoreError,
    StoreFull,
    TaskExists,
    TaskNotFound,
    UnsupportedBackbone,
    VersionMismatch,
)


class Unauthorized(RepServeError):
    """No bearer token where one is required."""

    code = "unauthorized"


class Forbidden(RepServeError):
    """A bearer token that is not the configured one."""

    code = "forbidden"


class MalformedRequest(RepServeError):
    """The request is syntactically wrong (missing field, bad multipart body, bad archive layout)."""

    code = "malformed_request"


class InvalidInput(RepServeError):
    """A request that is well-formed HTTP but not valid input (the Open Inference Protocol's 400): wrong tensor
    shape, datatype or data length, an unknown input or output."""

    code = "invalid_input"


class BuiltinTask(RepServeError):
    """The backbone's own classifier is served without a store entry, so it cannot be deleted."""

    code = "task_builtin"


class NotReady(RepServeError):
    """The service is still loading tasks or warming up (see /readyz)."""

    code = "not_ready"


class QueueFull(RepServeError):
    """Backpressure: too many images are waiting; retry later or on another replica."""

    code = "queue_full"


class InferenceTimeout(RepServeError):
    """The request was not answered within ``request_timeout_s``."""

    code = "timeout"


class ShuttingDown(RepServeError):
    """The engine stopped before the request was served."""

    code = "shutting_down"


class TaskUnavailable(RepServeError):
    """A listed task cannot be served: its stored bundle failed its checks when first loaded (until the store
    holds a new version of it), or the store could not be read (then ``retry_after_s``: a ``Retry-After``)."""

    code = "task_unavailable"

    def __init__(self, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class InferenceFailed(RepServeError):
    """The engine failed on a batch: a server bug or device failure, never bad input."""

    code = "inference_failed"


class Unhealthy(RepServeError):
    """Liveness failed: start-up failed or the inference worker died; the replica should be restarted."""

    code = "unhealthy"


class ClientClosed(RepServeError):
    """The client disconnected before its answer: its queued images were dropped unprocessed (nginx's 499;
    nobody receives this response, it names the outcome in logs and metrics)."""

    code = "client_closed_request"


PROTOCOL_PREFIX = "/v2"  # the Open Inference Protocol's routes (service.routes.v2): their errors take its body


def error_body(path: str, code: str, detail: str) -> dict[str, str]:
    """An error's JSON body for a request to ``path``: ``{"error": code, "detail": message}``, or under /v2 the
    Open Inference Protocol's ``{"error": message}``, which its clients read. The one shaping of error bodies:
    the app's exception handlers and the middleware (408) both answer with it."""
    if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/"):
        return {"error": detail}
    return {"error": code, "detail": detail}


_RETRY_SOON = {"Retry-After": "1"}  # temporary: the replica is starting, stopping or busy

# error class -> (HTTP status, headers); a class not listed takes its nearest listed base's entry.
_HTTP: dict[type[RepServeError], tuple[int, dict[str, str]]] = {
    RepServeError: (500, {}),
    # the core's
    BundleError: (422, {}),  # ChecksumMismatch too
    BackboneMismatch: (409, {}),
    TaskNotFound: (404, {}),
    TaskExists: (409, {}),
    VersionMismatch: (409, {}),  # DELETE /tasks/NAME?version=N when another version is served
    UnsupportedBackbone: (422, {}),
    CheckpointError: (422, {}),
    ImageError: (415, {}),
    PayloadTooLarge: (413, {}),
    StoreError: (503, {}),
    StoreFull: (507, {}),
    # the service's
    Unauthorized: (401, {"WWW-Authenticate": "Bearer"}),
    Forbidden: (403, {}),
    MalformedRequest: (422, {}),
    InvalidInput: (400, {}),
    BuiltinTask: (409, {}),
    NotReady: (503, _RETRY_SOON),
    QueueFull: (503, _RETRY_SOON),
    InferenceTimeout: (503, _RETRY_SOON),
    ShuttingDown: (503, _RETRY_SOON),
    TaskUnavailable: (503, {}),  # Retry-After only when retrying can help: see http_headers
    InferenceFailed: (500, {}),
    Unhealthy: (503, {}),
    ClientClosed: (499, {}),
}


def _entry(error: type[RepServeError]) -> tuple[int, dict[str, str]]:
    return next(_HTTP[cls] for cls in error.__mro__ if cls in _HTTP)


def http_status(error: type[RepServeError]) -> int:
    """The HTTP status of an error class (5xx: the server's side, retrying may help; 4xx: the request's)."""
    return _entry(error)[0]


def http_headers(error: RepServeError) -> dict[str, str]:
    """The headers that go with an error's response (``Retry-After``, ``WWW-Authenticate``)."""
    headers = dict(_entry(type(error))[1])
    if isinstance(error, TaskUnavailable) and error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return headers
