"""ASGI middleware that records request metrics for every route, whatever the outcome.

Pure ASGI (not ``BaseHTTPMiddleware``): it only watches ``http.response.start`` for the status code, so
responses stream through untouched. It sits inside Starlette's error middleware, so 4xx responses made
by exception handlers are seen with their real status; an unhandled exception is recorded as 500.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

CLASSIFY_PATH = "/classify"


class MetricsMiddleware:
    """``repserve_http_*`` for every request; ``repserve_requests_total`` and
    ``repserve_request_duration_seconds`` for /classify.

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
        task = None
        if scope["path"] == CLASSIFY_PATH:  # label fixed at arrival: a task deleted meanwhile stays named
            names = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("task")
            task = self.task_label(names[0] if names else None)

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
