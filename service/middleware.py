"""ASGI middleware: request ids, a deadline on reading the body, and request metrics for every route.

Pure ASGI (not ``BaseHTTPMiddleware``), so responses stream through untouched. All sit inside Starlette's
error middleware, so 4xx responses made by exception handlers are seen with their real status; an
unhandled exception is recorded as 500. Order, outermost first: request id, metrics, body deadline.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body
from .logs import request_id
from .metrics import Metrics

REQUEST_ID_HEADER = b"x-request-id"
_CLIENT_ID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")  # what we echo and log: no spaces, no control bytes


class RequestIdMiddleware:
    """Takes the client's ``X-Request-ID`` (when it is a short printable token) or makes one, puts it in
    the log context of the request and echoes it in the response.

    The context variable is set in the request's own asyncio task and not reset, so the error middleware
    outside this one still logs with it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), None)
        rid = given.decode() if given is not None and _CLIENT_ID.match(given) else uuid.uuid4().hex
        request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class _BodyDeadline:
    """One request's body deadline, from its first ``receive``: past it, ``receive`` answers a disconnect (the
    app stops reading, as for a client that left) and ``send`` drops the app's answer to that (the
    middleware's 408 replaces it)."""

    def __init__(self, receive: Receive, send: Send, timeout_s: float) -> None:
        self._receive, self._send, self.timeout_s = receive, send, timeout_s
        self._loop = asyncio.get_running_loop()
        self._deadline: float | None = None
        self.complete = self.timed_out = self.started = False

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()
        if self._deadline is None:
            self._deadline = self._loop.time() + self.timeout_s
        try:
            message = await asyncio.wait_for(self._receive(), max(self._deadline - self._loop.time(), 0.0))
        except TimeoutError:
            self.timed_out = True
            return {"type": "http.disconnect"}
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.complete = True
        return message

    async def send(self, message: Message) -> None:
        if self.timed_out and not self.started:
            return  # the app's own answer to the "disconnect"
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class BodyDeadlineMiddleware:
    """A request's body must arrive within ``timeout_s`` of its first read, or the request gets 408.

    uvicorn bounds idle keep-alive connections but not a body that trickles in (or never comes: a
    ``Content-Length`` of 1,000 with 10 bytes sent), so without this a slow client holds a connection and
    a request slot forever. The deadline applies only while the body is incomplete: waiting for a
    disconnect afterwards is not bounded."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.timeout_s:
            await self.app(scope, receive, send)
            return
        guard = _BodyDeadline(receive, send, self.timeout_s)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.timed_out:
                raise
        if guard.timed_out and not guard.started:
            body = json.dumps(error_body(scope["path"], "body_timeout", f"the request body did not arrive within "
                                                                        f"{self.timeout_s:g} s")).encode()
            await send({"type": "http.response.start", "status": 408,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

CLASSIFY_PATH = "/classify"
_V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")  # the Open Inference Protocol's


def requested_task(scope: Scope) -> str | None:
    """The task an inference request names (/classify's ``task`` query, empty when missing; a v2 infer path's
    model); ``None`` for any other request."""
    if scope["path"] == CLASSIFY_PATH:
        names = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("task")
        return names[0] if names else ""
    infer = _V2_INFER.match(scope["path"])
    return infer.group(1) if infer else None


class MetricsMiddleware:
    """``repserve_http_*`` for every request; ``repserve_requests_total`` and
    ``repserve_request_duration_seconds`` for inference requests (/classify, /v2/models/{name}/infer).

    ``task_label`` maps the requested task name to a bounded label (served name or ``unknown``).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, task_label: Callable[[str | None], str]) -> None:
        self.app, self.metrics, self.task_label = app, metrics, task_label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        task = requested_task(scope)
        if task is not None:  # label fixed at arrival: a task deleted meanwhile stays named
            task = self.task_label(task)

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            handler = getattr(route, "path", None) or "unmatched"
            m = self.metrics
            m.http_requests.labels(handler=handler, method=scope["method"], code=str(status)).inc()
            m.http_duration.labels(handler=handler).observe(elapsed)
            if task is not None:
                m.requests.labels(task=task, code=str(status)).inc()
                m.request_duration.observe(elapsed)
