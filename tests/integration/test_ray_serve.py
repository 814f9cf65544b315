"""The Ray Serve application (deploy/ray) on a local Ray bound to loopback: two replicas over one store answer
exactly as the plain service does, and Ray's model multiplexing (model id = task) keeps each task's requests
on the replica that loaded it while spreading the tasks over both."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

# Ray's single-machine mode: the node address is 127.0.0.1 and every Ray server (GCS, raylet, workers,
# agents, Serve's proxy) binds to loopback only. Read when ray is imported, inherited by its processes.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install -e '.[ray]'")

from bench.servers import free_port  # noqa: E402
from deploy.ray.app import REPLICA_HEADER, RepServe  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.servicekit import TINY_ARCH, TINY_OPTIONS, answers, assert_predictions, stored, wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
TASKS = {"t0": 1, "t1": 2, "t2": 3, "t3": 4, "t4": 5}
ROUNDS = 3
SETTLE_S = 1.0  # a replica pushes the tasks it holds every 0.1 s; the proxy's router hears of it well within this


def settings(store: Path) -> dict[str, object]:
    """The same settings for the plain service and every replica: the tiny ViT, one torch thread."""
    return {"backbone": TINY_ARCH, "backbone_options": TINY_OPTIONS, "store": str(store), "torch_threads": 1,
            "max_delay_ms": 2.0}


def files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"img{i}.jpg", b, "image/jpeg")) for i, b in enumerate(images)]


@pytest.fixture(scope="module")
def store(tmp_path_factory, model) -> Path:
    root = tmp_path_factory.mktemp("ray") / "store"
    stored(root, [model.bundle(name, seed) for name, seed in TASKS.items()])
    return root


@pytest.fixture(scope="module")
def expected(store, images) -> dict[str, dict]:
    """Each task's /classify body from the plain service (in process) on the same store and images."""
    with TestClient(create_app(Settings(**settings(store)))) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "the plain service's readiness")
        out = {}
        for task in TASKS:
            response = client.post(f"/classify?task={task}", files=files(images))
            assert response.status_code == 200, response.text
            out[task] = response.json()
    return out


@pytest.fixture(scope="module")
def ray_url(store, expected) -> Iterator[str]:
    """Ray (2 CPUs, no dashboard) with Serve's proxy on a free loopback port, the app deployed with two
    replicas of half a CPU each; Serve and Ray are shut down in every case."""
    port = free_port()
    # Replicas import `deploy.ray.app` by name: give them the repository (no upload, unlike working_dir).
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = RepServe.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(**settings(store))
        serve.run(app, name="repserve", route_prefix="/")  # returns once both replicas are ready
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def test_ray_serve_answers_as_the_plain_service_and_tasks_stick_to_replicas(ray_url, expected, images):
    start = time.perf_counter()
    assert serve.status().applications["repserve"].deployments["RepServe"].status == "HEALTHY"
    seen: dict[str, list[str]] = defaultdict(list)
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        for round_ in range(ROUNDS):
            for task in TASKS:
                response = client.post("/classify", files=files(images), headers={"serve_multiplexed_model_id": task})
                assert response.status_code == 200, response.text
                body, want = response.json(), expected[task]
                assert (body["task"], body["task_version"]) == (want["task"], want["task_version"])
                assert [r["filename"] for r in body["results"]] == [r["filename"] for r in want["results"]]
                assert_predictions(answers(body), answers(want))
                seen[task].append(response.headers[REPLICA_HEADER])
                if round_ == 0:
                    time.sleep(SETTLE_S)  # let the router learn where it went: later tasks go elsewhere

        # ?task= alone is not routed by task (Ray's proxy reads the header only) but answers the same.
        response = client.post("/classify?task=t2", files=files(images))
        assert response.status_code == 200, response.text
        assert_predictions(answers(response.json()), answers(expected["t2"]))
        conflict = client.post("/classify?task=t1", files=files(images), headers={"serve_multiplexed_model_id": "t2"})
        assert conflict.status_code == 422
        assert conflict.json()["error"] == "malformed_request"
        unknown = client.post("/classify", files=files(images), headers={"serve_multiplexed_model_id": "nope"})
        assert unknown.status_code == 404
        assert unknown.json()["error"] == "task_not_found"

    for task, replicas in seen.items():
        assert len(set(replicas)) == 1, f"{task} moved between replicas: {replicas}"
    spread = Counter(replicas[0] for replicas in seen.values())
    print(f"tasks per replica: {dict(spread)}; requests took {time.perf_counter() - start:.1f} s")
    assert len(spread) == 2, f"every task went to one replica: {dict(seen)}"
