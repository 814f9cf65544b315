"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import NotReady, Unhealthy
from ..schemas import ErrorBody, Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": ErrorBody}})
def healthz(request: Request) -> Health:
    """Liveness: the process serves HTTP, start-up did not fail and the inference worker runs."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None:
        ok, detail = runtime.healthy
        if not ok:
            raise Unhealthy(detail)
    return Health()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": ErrorBody}})
def readyz(request: Request) -> Readiness:
    """Readiness: tasks loaded and warm-up done; 503 ``not_ready`` before (and while shutting down)."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None or not runtime.ready.is_set():
        detail = runtime.failure if runtime is not None and runtime.failure else "loading tasks and warming up"
        raise NotReady(detail)
    return Readiness(
        tasks=len(runtime.registry), device=str(runtime.backbone.device), dtype=runtime.settings.dtype,
        policy=runtime.settings.policy, active_task=runtime.engine.active_task, costs=runtime.engine.costs.snapshot(),
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Prometheus text exposition of this replica's metrics (names prefixed ``repserve_``)."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
