"""FastAPI dependencies: the runtime, readiness, and bearer-token auth.

All are ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in its thread pool,
a thread hop per dependency per request (measured: the largest avoidable cost of a request).

Tokens are compared in constant time (``hmac.compare_digest``). Roles: the admin token guards task
registration and deletion; the classify token guards /classify and task reads, which the admin token
may also use. A role whose token is not configured is open.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from .errors import Forbidden, NotReady, Unauthorized
from .lifecycle import Runtime
from .settings import Settings

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>` when a token is configured.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the service is starting")
    return runtime


async def ready_runtime(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Runtime:
    """The runtime, once tasks are loaded and warm-up is done (503 ``not_ready`` before)."""
    if not runtime.ready.is_set():
        raise NotReady("the service is loading tasks and warming up; see /readyz")
    return runtime


def _check(credentials: HTTPAuthorizationCredentials | None, accepted: list[SecretStr], role: str) -> None:
    if credentials is None:
        raise Unauthorized(f"{role} routes need 'Authorization: Bearer <token>'")
    given = credentials.credentials.encode()
    # Compare with every accepted token (no early exit), so timing reveals nothing.
    matches = [hmac.compare_digest(given, t.get_secret_value().encode()) for t in accepted]
    if not any(matches):
        raise Forbidden(f"the bearer token is not valid for {role} routes")


def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def require_admin(request: Request, credentials: Credentials) -> None:
    token = _settings(request).admin_token
    if token is not None:
        _check(credentials, [token], "management")


async def require_reader(request: Request, credentials: Credentials) -> None:
    s = _settings(request)
    if s.classify_token is not None:
        _check(credentials, [t for t in (s.classify_token, s.admin_token) if t is not None], "classification")


ReadyRuntime = Annotated[Runtime, Depends(ready_runtime)]
