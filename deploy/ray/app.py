"""RepServe as a Ray Serve application: each replica is the plain service (one backbone, its store, its
engine), and Ray's model multiplexing (model id = task) routes each task to the replicas that hold it.

Import path ``deploy.ray.app:build`` (see ``config.yaml`` and README.md next to this file). A replica runs
:func:`service.app.create_app` unchanged (same routes, errors, auth, metrics; Ray runs its lifespan, which
builds the :class:`~service.lifecycle.Runtime`) plus two things Ray needs:

* a middleware that reads the task from the multiplexed model id (header ``serve_multiplexed_model_id``,
  which Ray's proxy routes on) or from ``?task=``, and calls the ``@serve.multiplexed`` loader, which makes
  the task resident and tells Ray this replica holds it; it also names the replica in ``X-Replica``;
* readiness: the replica counts as started only once the runtime is ready (tasks read, warm-up done), and
  ``check_health`` is Ray's liveness probe on the runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from repadapter.errors import RepServeError
from service.app import create_app
from service.errors import MalformedRequest, http_status
from service.lifecycle import Runtime
from service.registry import TaskRef
from service.schemas import ErrorBody
from service.settings import Settings

TASKS_PER_REPLICA = 16
"""Default ``max_num_models_per_replica``: how many tasks a replica *advertises* to Ray's router (its LRU
of recently requested tasks). Memory is bounded by the service's byte-sized tiers, not by this count."""
REPLICA_HEADER = "X-Replica"


@contextlib.asynccontextmanager
async def _until_ready(app: FastAPI) -> AsyncIterator[None]:
    """Runs inside the service's own lifespan (FastAPI merges a router's lifespan into the app's), so the
    runtime exists; Ray routes to a replica once its lifespan started, hence: only when ready."""
    await anyio.to_thread.run_sync(app.state.runtime.wait_ready)  # a failure raises: Ray retries the replica
    yield


@serve.deployment(
    name="RepServe",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,  # the engine batches concurrent requests; its own queue bound answers 503 beyond
    health_check_period_s=10,
    health_check_timeout_s=30,
)
@serve.ingress()  # late-bound: the app is built per replica by __serve_build_asgi_app__
class RepServe:
    """One replica: the plain service's app over one Runtime, with the task as Ray's multiplexed model id."""

    def __init__(self, tasks_per_replica: int = TASKS_PER_REPLICA, **settings: Any) -> None:
        self.settings = Settings(**settings)
        self.replica = serve.get_replica_context().replica_id.unique_id

        async def load_task(task: str) -> TaskRef:
            """Ray's loader for model id ``task``: make the task's current version resident on this replica's
            device (store -> host -> device tiers, in a loader thread). Requests still use the version current
            when they arrive; this warms the task and tells Ray's router that this replica holds it."""
            runtime = self.runtime
            assert runtime is not None
            ref = runtime.registry.get(task)
            await runtime.residency.acquire(ref)
            return ref

        # Made per instance, so the bound comes from the config (Ray detects multiplexing set up at init).
        self.load_task = serve.multiplexed(max_num_models_per_replica=tasks_per_replica)(load_task)
        self.service_app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings)
        app.include_router(APIRouter(lifespan=_until_ready))
        app.middleware("http")(self._multiplex)
        self.service_app = app
        return app

    @property
    def runtime(self) -> Runtime | None:
        return None if self.service_app is None else getattr(self.service_app.state, "runtime", None)

    async def _multiplex(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """The task from Ray's model id (header; what the proxy routes on) or ``?task=``; the header one is
        passed on to the service's /classify as ``?task=``, so both forms answer the same."""
        model_id, query = serve.get_multiplexed_model_id(), request.query_params.get("task")
        if model_id and query is not None and query != model_id:
            body = ErrorBody(error=MalformedRequest.code, detail=f"the task is {model_id!r} in the "
                             f"serve_multiplexed_model_id header but {query!r} in ?task=; send one, or the same")
            return JSONResponse(body.model_dump(), status_code=http_status(MalformedRequest),
                                headers={REPLICA_HEADER: self.replica})
        if model_id and query is None:
            qs = request.scope.get("query_string", b"")
            request.scope["query_string"] = (qs + b"&" if qs else b"") + b"task=" + quote(model_id, safe="").encode()
        task, runtime = model_id or query, self.runtime
        if task and runtime is not None and runtime.ready.is_set() and task in runtime.registry:
            with contextlib.suppress(RepServeError):  # a task that fails to load: /classify answers why
                await self.load_task(task)
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = self.replica
        return response

    def check_health(self) -> None:
        """Ray's health check (a replica that fails it is replaced): the runtime is ready (always, once
        started: see ``_until_ready``), start-up did not fail and the engine's worker runs, as /healthz."""
        runtime = self.runtime
        if runtime is None or not runtime.ready.is_set():
            raise RuntimeError(f"not ready: {runtime.failure if runtime is not None else 'no runtime'}")
        ok, detail = runtime.healthy
        if not ok:
            raise RuntimeError(detail)


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``args`` (the config's ``args:``, or ``key=value`` after ``serve run``)
    are :class:`Settings` fields plus ``tasks_per_replica``; settings are validated here, so a typo fails
    the deploy instead of every replica. ``REPSERVE_*`` variables in the replicas' environment also apply."""
    args = dict(args)
    tasks = int(args.pop("tasks_per_replica", TASKS_PER_REPLICA))
    Settings(**args)
    return RepServe.bind(tasks, **args)
