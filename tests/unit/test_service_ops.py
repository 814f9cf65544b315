"""What operators rely on: request ids in responses and in every log line of the request, JSON logs with
one-line tracebacks, a deadline on slow request bodies, the standard process metrics, and 404s that name
only the missing task."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.logs import JsonFormatter, RequestIdFilter, configure_logging
from service.middleware import BodyDeadlineMiddleware
from tests.servicekit import multipart_bundle, stored
from tests.unit.test_service_api import start, tiny_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundles(model):
    return {name: model.bundle(name, seed) for name, seed in (("kept", 1), ("secret-task", 2))}


@pytest.fixture(scope="module")
def client(tmp_path_factory, bundles) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("ops") / "store"
    stored(root, [bundles["kept"], bundles["secret-task"]])
    yield from start(tiny_settings(root, store_poll_s=0))


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Root logging as the server configures it (JSON), captured."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_request_id_is_echoed_generated_or_replaced(client):
    assert client.get("/healthz", headers={"X-Request-ID": "req-42.a/b"}).headers["x-request-id"] == "req-42.a/b"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    assert int(generated, 16) >= 0
    for bad in (b"has space", b"x" * 129, "caf\u00e9".encode(), b"tab\there"):
        echoed = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert echoed.encode() != bad
        assert len(echoed) == 32


def test_every_log_line_of_a_request_carries_its_id(client, model, json_log):
    bundle = model.bundle("logged", 3)
    r = client.post("/tasks", files=multipart_bundle(bundle), headers={"X-Request-ID": "register-7"})
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == "register-7"
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    stored_line = [x for x in lines if "stored task=logged" in x["message"]]
    assert stored_line, lines  # the store logs from a worker thread: the id travels with the context
    assert {x["request_id"] for x in stored_line} == {"register-7"}
    client.get("/healthz")
    assert all(x["request_id"] in ("register-7", "-") for x in lines)


def test_json_log_keeps_a_traceback_on_one_line():
    stream = io.StringIO()
    configure_logging("info", "json")
    root = logging.getLogger()
    root.handlers[0].stream = stream
    try:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logging.getLogger("repserve.test").exception("failed")
    finally:
        root.handlers.clear()
    (line,) = stream.getvalue().splitlines()
    doc = json.loads(line)
    assert (doc["level"], doc["logger"], doc["message"], doc["request_id"]) == ("ERROR", "repserve.test", "failed", "-")
    assert "Traceback" in doc["exception"]
    assert "ValueError: boom" in doc["exception"]


def test_404_names_only_the_missing_task(client):
    r = client.post("/classify?task=nope", content=b"x", headers={"Content-Type": "image/png"})
    assert r.status_code == 404
    assert r.json()["error"] == "task_not_found"
    assert "nope" in r.json()["detail"]
    assert "secret-task" not in r.text
    assert "kept" not in r.text


def test_metrics_include_the_process_and_python_collectors(client):
    text = client.get("/metrics").text
    for series in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "python_info",
                   "python_gc_objects_collected_total"):
        assert f"\n{series}" in text, series


async def _body_echo(scope, receive, send) -> None:
    body = await Request(scope, receive).body()
    await JSONResponse({"got": len(body)})(scope, receive, send)


def run_asgi(app, chunks: list[bytes], *, stall: bool) -> tuple[list[dict], float]:
    """Drive ``app`` with a POST whose body comes in ``chunks``, then (``stall``) nothing more, forever."""
    sent: list[dict] = []

    async def main() -> float:
        queue = list(chunks)

        async def receive() -> dict:
            if queue:
                chunk = queue.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(queue) or stall}
            await asyncio.sleep(3600)  # a client that declared more bytes than it sends
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
        start = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), 10)
        return time.monotonic() - start

    return sent, asyncio.run(main())


def test_a_body_that_never_finishes_gets_408_at_the_deadline():
    app = BodyDeadlineMiddleware(_body_echo, timeout_s=0.3)
    sent, seconds = run_asgi(app, [b"x" * 10], stall=True)
    assert 0.3 <= seconds < 2.0
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"] == "body_timeout"
    assert len([m for m in sent if m["type"] == "http.response.start"]) == 1  # the app's own answer is dropped


def test_a_complete_body_is_untouched_by_the_deadline():
    sent, _ = run_asgi(BodyDeadlineMiddleware(_body_echo, timeout_s=0.3), [b"a" * 5, b"b" * 7], stall=False)
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"]) == {"got": 12}


@pytest.mark.parametrize(("errno_", "status", "code"), [(errno.ENOSPC, 507, "store_full"),
                                                        (errno.EROFS, 503, "store_error")])
def test_a_full_or_read_only_store_refuses_registration_and_keeps_classifying(client, model, monkeypatch, images,
                                                                              errno_, status, code):
    before = client.get("/tasks").json()
    import repadapter.store.local as local

    def failing_write(path, data) -> None:
        raise OSError(errno_, os.strerror(errno_), str(path))

    monkeypatch.setattr(local, "_write_file", failing_write)
    r = client.post("/tasks", files=multipart_bundle(model.bundle("nospace", 9)))
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert os.strerror(errno_) in r.json()["detail"]
    assert client.get("/tasks").json() == before
    assert client.get("/tasks/nospace").status_code == 404
    ok = client.post("/classify?task=kept", content=images[0], headers={"Content-Type": "image/jpeg"})
    assert ok.status_code == 200, ok.text


def images_served(client: TestClient, task: str) -> float:
    line = next((x for x in client.get("/metrics").text.splitlines()
                 if x.startswith(f'repserve_images_total{{task="{task}"}}')), None)
    return 0.0 if line is None else float(line.rsplit(" ", 1)[1])


def test_a_client_that_disconnects_frees_its_queued_work(client, images):
    """The worker is held busy; a request queues, then its client leaves: the answer is 499 at once and,
    once the worker is free again, its images are dropped unprocessed."""
    runtime = client.app.state.runtime
    client.post("/classify?task=kept", content=images[0], headers={"Content-Type": "image/jpeg"})  # loaded, warm
    served = images_served(client, "kept")
    busy = threading.Thread(target=runtime.engine.call, args=(lambda: time.sleep(1.5),))
    busy.start()
    time.sleep(0.2)

    async def leaving_client() -> tuple[list[dict], float]:
        body, sent = images[0], []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.3)  # queued by now; then the client goes away
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/classify", "raw_path": b"/classify", "query_string": b"task=kept",
                 "root_path": "", "server": ("testserver", 80), "client": ("testclient", 50000),
                 "headers": [(b"content-type", b"image/jpeg"), (b"content-length", str(len(body)).encode())]}
        start = time.monotonic()
        await client.app(scope, receive, send)
        return sent, time.monotonic() - start

    sent, seconds = client.portal.call(leaving_client)
    assert sent[0]["status"] == 499
    assert seconds < 1.2  # answered at the disconnect, not when the worker got to it
    busy.join(10)
    time.sleep(0.3)  # the worker runs again; the abandoned item is skipped
    assert images_served(client, "kept") == served
    assert client.post("/classify?task=kept", content=images[0],
                       headers={"Content-Type": "image/jpeg"}).status_code == 200
    assert images_served(client, "kept") == served + 1
