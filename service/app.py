"""The FastAPI application: lifespan, error mapping, middleware and routers. Deliberately thin.

``create_app(settings)`` builds an independent app (own metrics registry, own runtime), so tests and
embedders can create several in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from repadapter.errors import RepServeError, describe_validation_error

from . import __version__, openapi
from .errors import error_body, http_headers, http_status
from .lifecycle import Runtime
from .metrics import Metrics
from .middleware import BodyDeadlineMiddleware, MetricsMiddleware, RequestIdMiddleware
from .routes import classify, health, tasks, v2
from .routes import ui as try_it_page
from .settings import Settings

log = logging.getLogger(__name__)

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _error(request: Request, status: int, code: str, detail: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """The error body: ``{"error": code, "detail": message}``; under /v2 the Open Inference Protocol's
    ``{"error": message}``, which its clients read."""
    return JSONResponse(error_body(request.url.path, code, detail), status_code=status, headers=headers)


async def _repserve_error(request: Request, exc: Exception) -> JSONResponse:
    """Every RepServe error, core or service: its status and headers from the one table in service.errors."""
    assert isinstance(exc, RepServeError)
    status = http_status(type(exc))
    if status == 500:
        log.error("request failed code=%s detail=%s", exc.code, exc)
    return _error(request, status, exc.code, str(exc), http_headers(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _error(request, 422, "invalid_request", describe_validation_error(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _error(request, exc.status_code,
                  _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)


class _MethodNotAllowed:
    """ASGI endpoint of any method: 405 with ``Allow``, raised so the error handler answers it like every other."""

    def __init__(self, allow: str) -> None:
        self.allow = allow

    async def __call__(self, _scope: Scope, _receive: Receive, _send: Send) -> None:
        raise StarletteHTTPException(405, headers={"Allow": self.allow})


def _answer_other_methods(app: FastAPI) -> None:
    """A method a path does not take gets 405 with an ``Allow`` header naming *every* method the path takes.

    Starlette answers it with the ``Allow`` of the first route on the path only (``OPTIONS /tasks``: ``Allow:
    POST``, although GET /tasks is served too), so a catch-all route per path, after the real ones, answers
    instead (an ASGI endpoint: every method, not only GET). Call after the last route is added."""
    methods: dict[str, set[str]] = {}
    for route in iter_route_contexts(app.routes):
        if route.path is not None and route.methods:
            methods.setdefault(route.path, set()).update(route.methods)
    for path, allowed in methods.items():
        app.add_route(path, _MethodNotAllowed(", ".join(sorted(allowed))), include_in_schema=False)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _error(request, 500, "internal_error", "internal server error; see the server log")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    runtime = await anyio.to_thread.run_sync(Runtime, settings, app.state.metrics)
    app.state.runtime = runtime
    runtime.start()
    poller = asyncio.create_task(runtime.poll_store(), name="repserve-store-poll")
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, runtime.request_rescan)
        hup = True
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):  # not the main thread (tests)
        hup = False
    try:
        yield
    finally:
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await anyio.to_thread.run_sync(runtime.close)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new RepServe app; its runtime (backbone, tasks, engine) is built by the lifespan."""
    settings = settings or Settings()
    app = FastAPI(
        title="RepServe",
        version=__version__,
        description="Many image classifiers from one frozen backbone: RepAdapter task weights are merged in "
                    "or run per row, per batch. Errors are JSON `{\"error\": code, \"detail\": message}`.",
        lifespan=_lifespan,
        # A streaming bound for every body (chunked ones too); routes check their own, tighter limits.
        max_body_size=max(settings.max_bundle_bytes, settings.max_images_per_request * settings.max_image_bytes)
        + (1 << 20),
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.add_exception_handler(RepServeError, _repserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)

    def task_label(name: str | None) -> str:
        runtime: Runtime | None = getattr(app.state, "runtime", None)
        return name if name is not None and runtime is not None and name in runtime.registry else "unknown"

    # added innermost first: request id (outermost), metrics, body deadline
    app.add_middleware(BodyDeadlineMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, task_label=task_label)
    app.add_middleware(RequestIdMiddleware)
    for router in (classify.router, tasks.router, health.router):
        app.include_router(router)
    app.include_router(v2.router)  # the Open Inference Protocol (KServe v2, Triton's HTTP API)
    app.include_router(try_it_page.router)  # GET / and /static/*: the try-it page, not in the schema
    _answer_other_methods(app)
    openapi.install(app, settings)
    return app
