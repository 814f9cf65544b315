"""The RepServe HTTP API as the command line uses it: base URL and token from flags or the environment,
every failure one line (the server's JSON ``detail``) and exit code 1.

The token is read from the environment only (a command line is visible to other users) and never printed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from training.export import Hints

DEFAULT_URL = "http://localhost:8000"
CONNECT_TIMEOUT_S = 5.0


class ClientError(Exception):
    """A request failed (connection, HTTP status); the message is the one line printed."""


class MissingExtra(ClientError):
    """An optional dependency is not installed: one line naming the extra that brings it."""

    def __init__(self, extra: str, e: ImportError) -> None:
        super().__init__(f"needs the {extra!r} extra ({e.name or e} is missing): pip install 'repserve[{extra}]'")


def env_names() -> tuple[str, str]:
    """The client's variables, ``(REPSERVE_URL, REPSERVE_TOKEN)``: defined once, in :mod:`service.settings`
    (the server knows them, so exporting them does not make it warn). Imported on use: that module needs
    pydantic-settings (the serve extra), which a core-only install lacks."""
    try:
        from service.settings import CLIENT_TOKEN_ENV, CLIENT_URL_ENV
    except ImportError as e:
        raise MissingExtra("serve", e) from e
    return CLIENT_URL_ENV, CLIENT_TOKEN_ENV


def registration_hints(url: str | None = None) -> Hints:
    """:class:`training.export.Hints` naming what a ``repserve`` user passes (not ``python -m training``'s
    ``--register``/``--token``) in a refused registration's message: ``url`` (default: ``--url or $REPSERVE_URL``)
    and the token variables."""
    from training.export import Hints

    url_env, token_env = env_names()
    return Hints(url=url or f"--url or ${url_env}", token=f"${token_env} or $REPSERVE_ADMIN_TOKEN")


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--json`` and ``--timeout``: the options every client command shares."""
    url_env, _ = env_names()
    parser.add_argument("--url", default=os.environ.get(url_env, DEFAULT_URL),
                        help=f"server base URL (default: ${url_env} or {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer instead of a table")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer (default: 60)")


def token_from_env(admin: bool, environ: Mapping[str, str] = os.environ) -> str | None:
    """``$REPSERVE_TOKEN``, else the server's own variable for the role: ``REPSERVE_ADMIN_TOKEN`` for
    management; ``REPSERVE_CLASSIFY_TOKEN`` then ``REPSERVE_ADMIN_TOKEN`` (which the server also accepts)
    for classification and reads. Operators who run the client next to the server have those set already."""
    token_env = env_names()[1]
    names = [token_env, "REPSERVE_ADMIN_TOKEN"] if admin else [token_env, "REPSERVE_CLASSIFY_TOKEN",
                                                               "REPSERVE_ADMIN_TOKEN"]
    return next((environ[n] for n in names if environ.get(n)), None)


def error_line(response: httpx.Response) -> str:
    """``<METHOD> <path>: <status> <error>: <detail>`` from the server's ``{"error", "detail"}`` body."""
    request = response.request
    where = f"{request.method} {request.url.path}: {response.status_code}"
    try:
        body = response.json()
        return f"{where} {body['error']}: {body['detail']}"
    except (ValueError, KeyError, TypeError):
        return f"{where} {response.reason_phrase}: {response.text[:300].strip()}"


class Client:
    """Requests to one server; raises :class:`ClientError` for anything but a 2xx answer."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:  # imported on use: `repserve --help` and `repserve train` need no httpx
            import httpx
        except ImportError as e:
            raise MissingExtra("serve", e) from e
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, CONNECT_TIMEOUT_S))
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = httpx.request(method, self.url + path, headers=headers, timeout=timeout, **kwargs)
        except httpx.ConnectError as e:
            raise ClientError(f"cannot connect to {self.url} ({e}); is the server running? "
                              f"(--url, ${env_names()[0]})") from e
        except httpx.HTTPError as e:
            raise ClientError(f"{method} {self.url}{path}: {type(e).__name__}: {e}") from e
        if response.is_error:
            raise ClientError(error_line(response))
        return response

    def classify(self, task: str, images: list[Path], top_k: int) -> dict[str, Any]:
        files = []
        for path in images:
            try:
                files.append(("files", (path.name, path.read_bytes(), "application/octet-stream")))
            except OSError as e:
                raise ClientError(f"cannot read {path}: {e.strerror or e}") from e
        return self.request("POST", "/classify", params={"task": task, "top_k": top_k}, files=files).json()

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of a request; anything else is a :class:`ClientError` (``--url`` names another server)."""
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as e:
            raise not_repserve(response) from e

    def tasks(self) -> list[dict[str, Any]]:
        body = self.json("GET", "/tasks")
        if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
            raise ClientError(f"GET {self.url}/tasks: not a RepServe task list (is {self.url} a RepServe server?)")
        return body["tasks"]

    def task(self, name: str) -> dict[str, Any]:
        body = self.json("GET", f"/tasks/{name}")
        if not isinstance(body, dict):
            raise ClientError(f"GET {self.url}/tasks/{name}: not a RepServe task (is {self.url} a RepServe server?)")
        return body

    def delete(self, name: str, version: int | None = None) -> None:
        """``DELETE /tasks/NAME``; with ``version``, the server deletes only that version (409 otherwise),
        checked under its registration lock: a task replaced meanwhile is never deleted."""
        params = {"version": version} if version is not None else {}
        self.request("DELETE", f"/tasks/{name}", params=params)


def not_repserve(response: httpx.Response) -> ClientError:
    request = response.request
    return ClientError(f"{request.method} {request.url}: {response.status_code}, but not a RepServe answer "
                       f"({response.headers.get('content-type', 'no content type')}); is --url a RepServe server?")


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def table(rows: list[list[object]], headers: list[str]) -> str:
    """A plain left-aligned text table (columns padded to their widest cell)."""
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)
