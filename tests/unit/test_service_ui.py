"""The try-it page through TestClient: ``GET /`` is the HTML that tests/integration/test_browser.py drives, its
assets are served with their content types and caching headers, anything else under /static is the API's JSON
404, none of it is in the OpenAPI schema, and it ships in the package. Also the listing's ``first_labels``, which
the page's task table shows."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from repadapter import LocalStore
from service.app import create_app
from service.routes import ui
from service.settings import Settings
from tests.servicekit import TINY_ARCH, TINY_OPTIONS, wait_for

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "service" / "static"


class Page(HTMLParser):
    """Every element's tag and attributes, and the text of each ``<label for=...>``."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.labels: dict[str, str] = {}
        self._label: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag == "label":
            self._label = dict(attrs).get("for")
            if self._label:
                self.labels.setdefault(self._label, "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._label = None

    def handle_data(self, data: str) -> None:
        if self._label:
            self.labels[self._label] += data

    def by_id(self, element_id: str) -> tuple[str, dict[str, str | None]]:
        found = [e for e in self.elements if e[1].get("id") == element_id]
        assert len(found) == 1, f"{len(found)} elements with id {element_id!r}"
        return found[0]


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    """The app without its runtime (no lifespan): the page needs none."""
    return TestClient(create_app(Settings(store=str(tmp_path_factory.mktemp("ui") / "store"))))


@pytest.fixture(scope="module")
def page(client) -> Page:
    return Page(client.get("/").text)


def asset_refs(page: Page) -> list[str]:
    return [a.get("href") or a.get("src") or "" for tag, a in page.elements if tag in ("link", "script", "img")]


def test_page_is_html_with_its_controls(client, page):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.text.startswith("<!doctype html>")
    tag, attrs = page.by_id("task")
    assert tag == "select"
    tag, attrs = page.by_id("files")
    assert (tag, attrs["type"], attrs["accept"], "multiple" in attrs) == ("input", "file", "image/*", True)
    assert page.by_id("top-k")[1]["type"] == "number"
    for element_id in ("drop-zone", "results", "latency", "status", "error", "tasks-table", "tasks-body",
                       "classify-button", "token-form"):
        page.by_id(element_id)
    assert page.by_id("error")[1]["role"] == "alert"
    assert "hidden" in page.by_id("token-section")[1]  # shown by the script after a 401 or 403
    assert page.by_id("token")[1]["type"] == "password"
    headers = [e for e in page.elements if e[0] == "th" and e[1].get("scope") == "col"]
    assert len(headers) == 5
    assert ("html", {"lang": "en"}) in page.elements


def test_every_control_has_a_label(page):
    for tag, attrs in page.elements:
        if tag in ("input", "select", "textarea"):
            assert page.labels.get(attrs["id"] or "", "").strip(), f"no <label for={attrs['id']}>"


def test_page_needs_nothing_from_the_network(client, page):
    refs = asset_refs(page)
    assert refs
    assert all(re.fullmatch(r"/static/[\w.-]+\?v=[0-9a-f]{16}", ref) for ref in refs), refs
    for ref in refs:
        assert client.get(ref).status_code == 200, ref
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", client.get("/").text)
    assert "<style" not in client.get("/").text  # the CSP allows no inline style or script
    assert not [a for tag, a in page.elements if tag == "script" and not a.get("src")]


def test_page_headers(client):
    r = client.get("/")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-content-type-options"] == "nosniff"
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    again = client.get("/", headers={"If-None-Match": r.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    assert client.head("/").status_code == 200


@pytest.mark.parametrize(("name", "content_type"), [
    ("app.js", "text/javascript; charset=utf-8"),
    ("style.css", "text/css; charset=utf-8"),
    ("favicon.svg", "image/svg+xml"),
])
def test_assets_have_their_content_type_and_caching(client, page, name, content_type):
    versioned = next(ref for ref in asset_refs(page) if ref.startswith(f"/static/{name}?"))
    r = client.get(versioned)
    assert r.status_code == 200
    assert r.headers["content-type"] == content_type
    assert r.content == (STATIC / name).read_bytes()
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"  # the URL changes with the content
    assert r.headers["x-content-type-options"] == "nosniff"
    plain = client.get(f"/static/{name}")  # not the page's URL: it may change under the same URL
    assert plain.headers["cache-control"] == "no-cache"
    assert plain.headers["etag"] == r.headers["etag"]
    assert client.get(f"/static/{name}", headers={"If-None-Match": f'W/{r.headers["etag"]}'}).status_code == 304


@pytest.mark.parametrize("path", ["/static/missing.js", "/static/index.html", "/static/..%2Fapp.py",
                                  "/static/a/app.js", "/static/"])
def test_missing_asset_is_the_apis_json_404(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == "not_found"


def test_other_methods_are_405_naming_get_and_head(client):
    for method, path in (("POST", "/"), ("DELETE", "/static/app.js")):
        r = client.request(method, path)
        assert (r.status_code, r.headers["allow"], r.json()["error"]) == (405, "GET, HEAD", "method_not_allowed")


def test_page_is_not_in_the_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/static")]


def test_script_never_writes_html():
    """Task names, labels and error details come from users: the script sets text, never markup."""
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


def test_static_files_ship_in_the_package():
    """A non-editable install carries service/static/: pyproject's package-data names every file there."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert {"static/index.html", "static/app.js", "static/style.css"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), name
    served = {ui.PAGE_NAME, *ui.ASSETS}
    assert served == {Path(f).name for f in files}  # and the app serves every one of them


# ---- the listing's first labels (the page's task table) --------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, model, one_torch_thread) -> Iterator[TestClient]:
    store = LocalStore(tmp_path_factory.mktemp("ui-served") / "store")
    store.put(model.bundle("seven", 1, classes=7))
    store.put(model.bundle("two", 2, classes=2))
    settings = Settings(backbone=TINY_ARCH, backbone_options=TINY_OPTIONS, store=store.root, store_poll_s=0)
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "readiness")
        yield client


def test_listing_shows_the_first_labels(served):
    listed = {t["name"]: t for t in served.get("/tasks").json()["tasks"]}
    assert (listed["seven"]["num_labels"], listed["seven"]["labels"]) == (7, None)
    assert listed["seven"]["first_labels"] == [f"seven-{i}" for i in range(5)]
    assert listed["two"]["first_labels"] == ["two-0", "two-1"]
    one = served.get("/tasks/seven").json()
    assert (one["first_labels"], one["labels"]) == ([f"seven-{i}" for i in range(5)], [f"seven-{i}" for i in range(7)])
    assert served.get("/").status_code == 200  # the page beside a running API
