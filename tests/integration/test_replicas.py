"""Two real replicas on one store, a directory and an S3 bucket: a task registered on one is served by the
other within the poll interval, a new version follows, and a delete on either stops both."""

from __future__ import annotations

import time

import httpx
import pytest

from repadapter import TaskBundle
from tests.s3kit import CREDENTIALS, new_bucket
from tests.servicekit import Model, answers, assert_predictions, encode, multipart_bundle, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TOKEN = "replica-admin-token-0123"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
POLL_S = 0.5
SLACK_S = 15.0  # a loaded 2-core machine: process scheduling, the first load of the task
SIZE = 32


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load("embedded")


@pytest.fixture(scope="module")
def versions(model) -> list[TaskBundle]:
    return [model.bundle("shared", seed, size=SIZE, std=0.02) for seed in (1, 2)]


@pytest.fixture(scope="module")
def blobs(photos) -> list[bytes]:
    return [encode(p, "JPEG", (64, 48)) for p in photos[:2]]


@pytest.fixture(scope="module", params=["directory", "s3"])
def replicas(request, start_server, tmp_path_factory):
    """Two service processes on one store (``--store-poll-s 0.5``)."""
    env = None
    if request.param == "directory":
        store = str(tmp_path_factory.mktemp("shared") / "store")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        store = f"s3://{new_bucket(endpoint)}/tasks"
        env = {**CREDENTIALS, "REPSERVE_S3_ENDPOINT_URL": endpoint}
    flags = ("--admin-token", TOKEN, "--store-poll-s", str(POLL_S), "--builtin-task", "", "--torch-threads", "1",
             "--max-delay-ms", "2")
    return [start_server(store, *flags, env=env) for _ in range(2)]


def serves(url: str, version: int | None) -> bool:
    """Whether the replica at ``url`` lists task ``shared`` at ``version`` (``None``: not at all)."""
    r = httpx.get(f"{url}/tasks/shared", timeout=10)
    return r.status_code == 404 if version is None else (r.status_code == 200 and r.json()["version"] == version)


def classify(url: str, blobs: list[bytes]) -> httpx.Response:
    return httpx.post(f"{url}/classify?task=shared&top_k=3",
                      files=[("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)], timeout=30)


def test_register_on_one_replica_serve_on_the_other_delete_on_either(replicas, model, versions, blobs):
    a, b = replicas
    r = httpx.post(f"{a.url}/tasks", files=multipart_bundle(versions[0]), headers=ADMIN, timeout=60)
    assert r.status_code == 201, r.text
    start = time.monotonic()
    wait_for(lambda: serves(b.url, 1), POLL_S + SLACK_S, "replica B to see the task registered on A")
    seen_after = time.monotonic() - start
    answer = classify(b.url, blobs)
    assert answer.status_code == 200, answer.text
    assert answer.json()["task_version"] == 1
    assert_predictions(answers(answer.json()), model.predict(versions[0], blobs, top_k=3))

    r = httpx.post(f"{a.url}/tasks?overwrite=true", files=multipart_bundle(versions[1]), headers=ADMIN, timeout=60)
    assert r.status_code == 201, r.text
    wait_for(lambda: serves(b.url, 2), POLL_S + SLACK_S, "replica B to serve version 2")
    assert_predictions(answers(classify(b.url, blobs).json()), model.predict(versions[1], blobs, top_k=3))

    assert httpx.delete(f"{b.url}/tasks/shared", headers=ADMIN, timeout=30).status_code == 204
    wait_for(lambda: serves(a.url, None), POLL_S + SLACK_S, "replica A to drop the task deleted on B")
    gone = classify(a.url, blobs)
    assert gone.status_code == 404
    assert gone.json()["error"] == "task_not_found"
    print(f"replica B saw the new task after {seen_after:.2f} s (poll interval {POLL_S} s)")
