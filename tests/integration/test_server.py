"""The real server process over real HTTP: answers equal offline merged predictions, the store is
re-read on SIGHUP, a bundle made by the training CLI is served, and concurrent traffic while tasks
are registered, replaced and deleted never gets another task's (or version's) answer."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from repadapter import LocalStore, TaskBundle
from tests.servicekit import (
    Model,
    answers,
    archive,
    assert_predictions,
    encode,
    multipart_bundle,
    stored,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "integration-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SIZE = 32  # px: the embedded MobileNetV2 at a CPU-friendly input size
STORED = {"t0": 1, "t1": 2, "t2": 3, "t3": 4, "gone": 5}




@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load("embedded")


@pytest.fixture(scope="module")
def bundles(model) -> dict[str, TaskBundle]:
    out = {name: model.bundle(name, seed, size=SIZE, std=0.02) for name, seed in STORED.items()}
    out["probe"] = model.bundle("probe", 6, size=SIZE, adapters=False)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, bundles) -> LocalStore:
    return stored(tmp_path_factory.mktemp("served") / "store", bundles.values())


@pytest.fixture(scope="module")
def server(start_server, store):
    # One torch thread: on a shared 2-core machine, spinning OpenMP threads slow everything down.
    return start_server(store.root, "--admin-token", TOKEN, "--store-poll-s", "0", "--max-delay-ms", "5",
                        "--policy", "auto", "--log-level", "info", "--torch-threads", "1")


@pytest.fixture(scope="module")
def images(photos) -> list[bytes]:
    return [encode(p, "JPEG", (120, 90)) for p in photos]


def classify(client: httpx.Client, task: str, blobs: list[bytes]) -> httpx.Response:
    return client.post(f"/classify?task={task}&top_k=3",
                       files=[("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)])


def test_answers_equal_offline_merged_predictions(server, model, bundles, images):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for name, bundle in bundles.items():
            r = classify(client, name, images)
            assert r.status_code == 200, r.text
            assert r.json()["task_version"] == 1
            assert_predictions(answers(r.json()), model.predict(bundle, images, top_k=3))


def test_builtin_imagenet_recognises_the_cat(server, photos):
    cat = encode(photos[0], "JPEG")  # scikit-image's chelsea
    r = httpx.post(f"{server.url}/classify?task=imagenet&top_k=1", content=cat,
                   headers={"Content-Type": "image/jpeg"}, timeout=30)
    top = r.json()["results"][0]["predictions"][0]
    assert top["label"] == "Egyptian cat"
    assert top["score"] == pytest.approx(0.72, abs=0.05)


def test_sighup_rereads_the_store(server, store, model, images):
    bundle = model.bundle("hup", 7, size=SIZE, std=0.02)
    store.put(bundle)  # polling is off: only the signal makes it appear
    assert httpx.get(f"{server.url}/tasks/hup", timeout=10).status_code == 404
    server.signal(signal.SIGHUP)
    wait_for(lambda: httpx.get(f"{server.url}/tasks/hup", timeout=10).status_code == 200, 30, "SIGHUP re-scan")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert_predictions(answers(classify(client, "hup", images[:2]).json()),
                           model.predict(bundle, images[:2], top_k=3))


@pytest.mark.skipif(not (REPO / "training" / "__main__.py").is_file(), reason="the training CLI is not there yet")
def test_bundle_made_by_the_training_cli(server, model, tmp_path, photos):
    train_store = tmp_path / "trained"
    run = subprocess.run(
        [sys.executable, "-m", "training", "--data", "digits", "--task", "digits-cli", "--store", str(train_store),
         "--n-train", "40", "--n-val", "20", "--n-test", "20", "--max-steps", "3", "--batch-size", "16",
         "--image-size", str(SIZE), "--out-dir", str(tmp_path / "run"), "--no-progress", "--log-level", "WARNING"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    version_dir = next((train_store / "digits-cli").iterdir())
    blob = archive({p.name: p.read_bytes() for p in version_dir.iterdir()}, "tar.gz", prefix="digits-cli/")
    r = httpx.post(f"{server.url}/tasks", files=[("bundle", ("digits.tar.gz", blob, "application/gzip"))],
                   headers=ADMIN, timeout=60)
    assert r.status_code == 201, r.text

    digits = load_digits()
    real = [encode(Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB"), "PNG", (32, 32))
            for i in range(6)]
    blobs = [*real, encode(photos[0], "JPEG", (64, 48))]
    trained = LocalStore(train_store).get("digits-cli")
    got = httpx.post(f"{server.url}/classify?task=digits-cli&top_k=3",
                     files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)], timeout=30)
    assert got.status_code == 200, got.text
    assert_predictions(answers(got.json()), model.predict(trained, blobs, top_k=3))


def test_concurrent_traffic_while_tasks_change(server, store, model, bundles, images):
    """6 threads classify 5 tasks at once while `late` is registered, `t1` replaced twice and `gone`
    deleted. Every 200 equals the reference of the (task, version) it names; no 5xx; 404 only for
    `late` before its registration and `gone` after its deletion."""
    late = model.bundle("late", 8, size=SIZE, std=0.02)
    t1_versions = {1: bundles["t1"], 2: model.bundle("t1", 9, size=SIZE, std=0.02),
                   3: model.bundle("t1", 10, size=SIZE, std=0.02)}
    by_version = {(n, 1): b for n, b in bundles.items()} | {("t1", v): b for v, b in t1_versions.items()}
    by_version[("late", 1)] = late
    cuts = [(0, 1), (1, 3), (3, 4)]
    subsets = [images[a:b] for a, b in cuts]
    reference = {}
    for (name, v), b in by_version.items():  # one offline forward per task version, sliced per subset
        everything = model.predict(b, images, top_k=3)
        reference |= {(name, v, k): everything[a:b] for k, (a, b) in enumerate(cuts)}

    names = ["t0", "t1", "t2", "t3", "probe", "late", "gone"]
    per_thread, threads_n = 24, 6
    done = itertools.count()
    results: list[tuple[str, int, int, dict]] = []
    lock = threading.Lock()
    milestones = [threading.Event() for _ in range(4)]

    def classifier(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(per_thread):
                name, k = rng.choice(names), rng.randrange(len(subsets))
                r = classify(client, name, subsets[k])
                with lock:
                    results.append((name, k, r.status_code, r.json()))
                n = next(done)
                for i, event in enumerate(milestones):
                    if n >= (i + 1) * per_thread * threads_n // 6:
                        event.set()

    def admin() -> None:
        with httpx.Client(base_url=server.url, timeout=60, headers=ADMIN) as client:
            milestones[0].wait(120)
            assert client.post("/tasks", files=multipart_bundle(late)).status_code == 201
            milestones[1].wait(120)
            assert client.post("/tasks?overwrite=true", files=multipart_bundle(t1_versions[2])).json()["version"] == 2
            milestones[2].wait(120)
            assert client.delete("/tasks/gone").status_code == 204
            milestones[3].wait(120)
            assert client.post("/tasks?overwrite=true", files=multipart_bundle(t1_versions[3])).json()["version"] == 3

    admin_errors: list[BaseException] = []

    def guarded_admin() -> None:
        try:
            admin()
        except BaseException as e:  # reported below: a thread's assert would otherwise vanish
            admin_errors.append(e)

    threads = [threading.Thread(target=classifier, args=(i,)) for i in range(threads_n)]
    threads.append(threading.Thread(target=guarded_admin))
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "threads still running"
    assert not admin_errors, admin_errors

    assert len(results) == per_thread * threads_n
    statuses = {code for _, _, code, _ in results}
    assert statuses <= {200, 404}, [r for r in results if r[2] not in (200, 404)][:3]
    versions_seen = _check_answers(results, reference)
    assert {("t0", 1), ("t2", 1), ("t3", 1), ("probe", 1)} <= versions_seen
    assert len({v for n, v in versions_seen if n == "t1"}) >= 2  # answers from more than one t1 version
    assert store.versions("t1") == [1, 2, 3]
    assert store.versions("gone") == []


def _check_answers(results: list[tuple[str, int, int, dict]], reference: dict) -> set[tuple[str, int]]:
    """Each answer of the concurrent test: a 404 only for `late` or `gone`; a 200 equal to the reference of
    the (task, version) it names. Returns the (task, version) pairs answered."""
    versions_seen = set()
    for name, k, code, body in results:
        if code == 404:
            assert name in ("late", "gone")
            assert body["error"] == "task_not_found"
            continue
        assert body["task"] == name
        versions_seen.add((name, body["task_version"]))
        assert_predictions(answers(body), reference[(name, body["task_version"], k)])
    return versions_seen


def test_sigterm_drains_and_exits(server):
    """Last in this module: stops the shared server. uvicorn re-raises SIGTERM after its graceful shutdown."""
    assert server.stop() in (0, -signal.SIGTERM)
    log = server.log_tail(200_000)
    assert "Traceback" not in log
    assert "level=ERROR" not in log
