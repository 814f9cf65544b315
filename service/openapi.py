"""The OpenAPI schema of a configured server: FastAPI's, adjusted to what this process enforces.

FastAPI describes the routes as written, not as configured: every route behind a token dependency declares
bearer auth whether or not that token is set, and hand-written multipart bodies say less than the server
checks. Clients, generated SDKs and the API fuzz test (``tests/integration/test_fuzz.py``) take the schema as
the contract, so :func:`install` makes ``app.openapi()`` describe *this* process:

- Security: an operation declares a bearer scheme only when the token of its role is set (``adminToken``:
  POST/DELETE /tasks; ``classifyToken``: /classify and task reads, which the admin token also opens), and
  401/403 only then. With no token set the schema has no security at all.
- Errors: every error body is :class:`~service.schemas.ErrorBody`, request validation included (FastAPI's
  ``HTTPValidationError`` is never sent).
- Multipart bodies: :func:`service.uploads.read_files` refuses fields it was not asked for
  (``additionalProperties: false``); /classify takes 1 to ``max_images_per_request`` image ``files``;
  POST /tasks takes ``manifest`` and ``tensors``, or one ``bundle`` archive, never both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import BaseRoute

from .deps import require_admin, require_reader
from .settings import Settings

ADMIN_SCHEME, CLASSIFY_SCHEME = "adminToken", "classifyToken"
_AUTH_STATUSES = ("401", "403")
_ERROR_REF = "#/components/schemas/ErrorBody"
_FASTAPI_ERROR_SCHEMAS = ("HTTPValidationError", "ValidationError")
_MULTIPART = "multipart/form-data"

JSON = dict[str, Any]


def install(app: FastAPI, settings: Settings) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) the configured schema.

    FastAPI builds its schema on first use and again after routes change, caching it; each new one is
    adjusted once, in place, so the cache holds the adjusted schema."""
    adjusted: list[JSON] = []

    def openapi() -> JSON:
        schema = FastAPI.openapi(app)
        if not adjusted or adjusted[0] is not schema:
            adjusted[:] = [configured(schema, app.routes, settings)]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def configured(schema: JSON, routes: Sequence[BaseRoute], settings: Settings) -> JSON:
    """``schema`` (FastAPI's, changed in place) as enforced by a server with ``settings`` and ``routes``."""
    requirements, schemes = _security(settings)
    for route in iter_route_contexts(routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        role = _role(route.dependant)
        for method in route.methods:
            operation = schema["paths"][route.path_format][method.lower()]
            _set_security(operation, requirements.get(role, []) if role else [])
            _errors_are_error_bodies(operation)
            _describe_body(operation, route.path_format, method, settings)
    components = schema.setdefault("components", {})
    components.pop("securitySchemes", None)
    if schemes:
        components["securitySchemes"] = schemes
    _drop_unreferenced(schema, _FASTAPI_ERROR_SCHEMAS)
    return schema


def _security(settings: Settings) -> tuple[dict[str, list[JSON]], JSON]:
    """Per role, the operation's ``security`` (alternatives), and the schemes they name; empty for an open role."""
    schemes: JSON = {}
    if settings.admin_token is not None:
        schemes[ADMIN_SCHEME] = {"type": "http", "scheme": "bearer", "description": "The admin token "
                                 "(`REPSERVE_ADMIN_TOKEN`): registers and deletes tasks, and opens every "
                                 "route the classify token opens."}
    if settings.classify_token is not None:
        schemes[CLASSIFY_SCHEME] = {"type": "http", "scheme": "bearer", "description": "The classify token "
                                    "(`REPSERVE_CLASSIFY_TOKEN`): /classify and task reads."}
    requirements: dict[str, list[JSON]] = {}
    if ADMIN_SCHEME in schemes:
        requirements["admin"] = [{ADMIN_SCHEME: []}]
    if CLASSIFY_SCHEME in schemes:
        requirements["reader"] = [{name: []} for name in (CLASSIFY_SCHEME, ADMIN_SCHEME) if name in schemes]
    return requirements, schemes


def _role(dependant: Dependant) -> str | None:
    """``admin`` or ``reader`` when the route depends on that token check (at any depth), else ``None``."""
    calls = {d.call for d in _walk(dependant)}
    if require_admin in calls:
        return "admin"
    if require_reader in calls:
        return "reader"
    return None


def _walk(dependant: Dependant) -> Iterator[Dependant]:
    for sub in dependant.dependencies:
        yield sub
        yield from _walk(sub)


def _set_security(operation: JSON, requirement: list[JSON]) -> None:
    responses = operation["responses"]
    if not requirement:  # open: no credentials asked for, and none refused
        operation.pop("security", None)
        for status in _AUTH_STATUSES:
            responses.pop(status, None)
        return
    operation["security"] = requirement
    for status, description in zip(_AUTH_STATUSES, ("No bearer token.", "A bearer token that is not valid here."),
                                    strict=True):
        responses.setdefault(status, {"content": {"application/json": {"schema": {"$ref": _ERROR_REF}}}})
        responses[status]["description"] = description
    responses["401"]["headers"] = {"WWW-Authenticate": {"required": True, "description": "`Bearer`.",
                                                        "schema": {"type": "string"}}}


def _errors_are_error_bodies(operation: JSON) -> None:
    """The validation handler answers 422 as every other error (``{"error", "detail"}``)."""
    for response in operation["responses"].values():
        for media in response.get("content", {}).values():
            if media.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1] in _FASTAPI_ERROR_SCHEMAS:
                media["schema"] = {"$ref": _ERROR_REF}


def _describe_body(operation: JSON, path: str, method: str, settings: Settings) -> None:
    media = operation.get("requestBody", {}).get("content", {}).get(_MULTIPART)
    if media is None:
        return
    body = media["schema"]
    body["additionalProperties"] = False  # uploads.read_files: "unexpected form field"
    if (method, path) == ("POST", "/classify"):
        files = body["properties"]["files"]
        files.update(minItems=1, maxItems=settings.max_images_per_request)
        media["encoding"] = {"files": {"contentType": "image/*"}}
    elif (method, path) == ("POST", "/tasks"):
        body["oneOf"] = [  # (false: the field must be absent)
            {"required": ["manifest", "tensors"], "properties": {"bundle": False}},
            {"required": ["bundle"], "properties": {"manifest": False, "tensors": False}},
        ]
        media["encoding"] = {"manifest": {"contentType": "application/json"},
                             "tensors": {"contentType": "application/octet-stream"},
                             "bundle": {"contentType": "application/zip, application/x-tar, application/gzip"}}


def _drop_unreferenced(schema: JSON, names: Sequence[str]) -> None:
    """Remove component schemas ``names`` once nothing refers to them (other than each other)."""
    components = schema.get("components", {}).get("schemas", {})
    kept = {k: v for k, v in schema.items() if k != "components"}
    text = json.dumps([kept, {k: v for k, v in components.items() if k not in names}])
    for name in names:
        if f'"#/components/schemas/{name}"' not in text:
            components.pop(name, None)
