"""The try-it page: ``GET /`` and its assets ``GET /static/{name}`` (``service/static/``), outside the OpenAPI schema.

Static HTML, CSS and vanilla JS, no build step and nothing from the network: the page calls the API
(``GET /tasks``, ``POST /classify``) from the browser like any other client, with the bearer token the
user types once the API answers 401 or 403.

The files are read once, at import, from the installed package (``[tool.setuptools.package-data]``), and
only those are served: no path from the request ever reaches the file system. Caching: the page is
``no-cache`` (revalidated by ``ETag``, so a new release shows at once); it names its assets with their
content hash (``/static/app.js?v=<hash>``), which are then cached for a year as ``immutable``; an asset
asked for without its current hash is ``no-cache`` too.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.resources import files

from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException

router = APIRouter(include_in_schema=False)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
PAGE_NAME = "index.html"
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# The page runs only its own script and style, talks only to this origin, and shows images only from
# the user's own files (blob: URLs); nothing may frame it.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_COMMON = {"X-Content-Type-Options": "nosniff"}
_PAGE_HEADERS = {**_COMMON, "Content-Security-Policy": PAGE_POLICY, "Referrer-Policy": "no-referrer"}
_ASSET_REF = re.compile(r'(?P<attr>(?:href|src)=")/static/(?P<name>[^"?#]+)"')


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    version: str  # hex prefix of the content's SHA-256

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @classmethod
    def of(cls, body: bytes, content_type: str) -> Asset:
        return cls(body, content_type, hashlib.sha256(body).hexdigest()[:16])


def _load() -> tuple[Asset, dict[str, Asset]]:
    """The page (with its asset references versioned) and every other file of ``service/static/``."""
    folder = files(__package__.rpartition(".")[0]).joinpath("static")  # service/static
    assets: dict[str, Asset] = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in CONTENT_TYPES and not item.name.startswith("."):
            assets[item.name] = Asset.of(item.read_bytes(), CONTENT_TYPES[suffix])
    page = assets.pop(PAGE_NAME)

    def versioned(m: re.Match[str]) -> str:
        asset = assets.get(m["name"])
        if asset is None:
            raise RuntimeError(f"{PAGE_NAME} refers to /static/{m['name']}, which service/static/ does not hold")
        return f'{m["attr"]}/static/{m["name"]}?v={asset.version}"'

    html = _ASSET_REF.sub(versioned, page.body.decode())
    return Asset.of(html.encode(), page.content_type), assets


PAGE, ASSETS = _load()


def _not_modified(request: Request, etag: str) -> bool:
    given = request.headers.get("if-none-match")
    if given is None:
        return False
    tags = {t.strip().removeprefix("W/") for t in given.split(",")}
    return etag in tags or "*" in tags


def _serve(request: Request, asset: Asset, cache: str, headers: dict[str, str]) -> Response:
    out = {**headers, "ETag": asset.etag, "Cache-Control": cache}
    if _not_modified(request, asset.etag):
        return Response(status_code=304, headers=out)
    return Response(asset.body, media_type=asset.content_type, headers=out)


@router.api_route("/", methods=["GET", "HEAD"])
async def page(request: Request) -> Response:
    """The try-it page."""
    return _serve(request, PAGE, REVALIDATE, _PAGE_HEADERS)


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def asset(name: str, request: Request) -> Response:
    """One file of the page; 404 (the API's JSON error) for any other name."""
    found = ASSETS.get(name)
    if found is None:
        raise HTTPException(404, f"no static file {name!r}")
    cache = IMMUTABLE if request.query_params.get("v") == found.version else REVALIDATE
    return _serve(request, found, cache, _COMMON)
