"""A replica SIGKILLed in the middle of registering a large task, on a directory store and on S3: after a
restart every earlier task answers identically, the interrupted version is either complete or absent (the
old one intact), and the dead writer's leftovers are collected after start-up.

Where the kill lands (reading, checking, folding or writing the upload) is up to timing; a kill exactly
between the tensors and the manifest is made deterministic at the store level (``tests/unit/test_store.py``
kills a writer inside its fsync; ``test_store_backends.py`` leaves tensors without a manifest on S3)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from repadapter.store import LocalStore, S3Store, open_store
from tests.s3kit import CREDENTIALS, client, new_bucket
from tests.servicekit import Model, encode, multipart_bundle, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TOKEN = "faults-admin-token-0123"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SIZE = 32
KILL_AT = (0.6, 0.9)  # of one registration's time: reading, checking, folding or writing the upload
BIG_CLASSES = 8000  # a 41 MB head: the write takes long enough to be interrupted


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load("embedded")


@pytest.fixture(scope="module")
def blobs(photos) -> list[bytes]:
    return [encode(p, "JPEG", (64, 48)) for p in photos[:2]]


def answer(url: str, task: str, blobs: list[bytes]) -> list:
    r = httpx.post(f"{url}/classify?task={task}&top_k=3",
                   files=[("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)], timeout=60)
    assert r.status_code == 200, r.text
    return [[(p["label"], round(p["score"], 5)) for p in res["predictions"]] for res in r.json()["results"]]


def leftovers(store: LocalStore | S3Store, endpoint: str | None) -> list[str]:
    """What a dead writer may leave: temp entries (directory), tensors no manifest references (S3)."""
    if isinstance(store, LocalStore):
        return sorted(p.name for p in (store.root / ".tmp").iterdir())
    keys = [o["Key"] for o in client(endpoint).list_objects_v2(Bucket=store.bucket).get("Contents", [])]
    referenced = {store.manifest(e.name, v).tensors_sha256 for e in store.list() for v in store.versions(e.name)}
    return sorted(k for k in keys if "/tensors/" in k and k.rsplit("/", 1)[1].split(".")[0] not in referenced)


def register(url: str, files: list, result: list[object]) -> None:
    """POST the task; records the status code, or the transport error of a server that died."""
    try:
        result.append(httpx.post(f"{url}/tasks?overwrite=true", files=files, headers=ADMIN, timeout=120).status_code)
    except httpx.HTTPError as e:
        result.append(type(e).__name__)


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_sigkill_mid_registration_loses_and_tears_nothing(kind, request, start_server, tmp_path, model, blobs):
    env, endpoint = None, None
    if kind == "directory":
        url = str(tmp_path / "store")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        url = f"s3://{new_bucket(endpoint)}/tasks"
        env = {**CREDENTIALS, "REPSERVE_S3_ENDPOINT_URL": endpoint, "REPSERVE_STORE_GC_GRACE_S": "0.001"}
    store = open_store(url, endpoint_url=endpoint)
    for name, seed in (("kept", 1), ("other", 2)):
        store.put(model.bundle(name, seed, size=SIZE, std=0.02))
    flags = ("--admin-token", TOKEN, "--store-poll-s", "0", "--builtin-task", "", "--torch-threads", "1")
    server = start_server(url, *flags, env=env)
    big = [multipart_bundle(model.bundle("big", seed, classes=BIG_CLASSES, size=SIZE, std=0.02)) for seed in (3, 4)]
    start = time.perf_counter()
    first: list[object] = []
    register(server.url, big[0], first)
    took = time.perf_counter() - start  # one whole registration: the kills below land inside the next ones
    assert first == [201]
    before = {task: answer(server.url, task, blobs) for task in ("kept", "other", "big")}
    outcomes, old = [], 1
    for fraction in KILL_AT:
        result: list[object] = []
        writer = threading.Thread(target=register, args=(server.url, big[1], result))
        writer.start()
        time.sleep(fraction * took)
        server.proc.kill()
        server.proc.wait(30)
        writer.join(60)
        torn = leftovers(store, endpoint)  # what the dead writer left half-done, if it was writing
        server = start_server(url, *flags, env=env)
        version = httpx.get(f"{server.url}/tasks/big", timeout=30).json()["version"]
        assert version in (old, old + 1)  # the old version, intact, or the new one, complete
        for task, expected in before.items():
            if task != "big" or version == old:
                assert answer(server.url, task, blobs) == expected, task
        assert store.get("big", version).manifest.version == version  # reads back whole, checksum verified
        r = httpx.post(f"{server.url}/classify?task=big", content=blobs[0], headers={"Content-Type": "image/jpeg"},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["task_version"] == version
        outcomes.append({"killed_after_s": round(fraction * took, 2), "client": result, "leftovers": len(torn),
                         "served_version": version})
        wait_for(lambda: leftovers(store, endpoint) == [], 60, "the dead writer's leftovers to be collected")
        if version != old:  # the kill came after the write: put the first content back as the old version
            old = store.put(model.bundle("big", 3, classes=BIG_CLASSES, size=SIZE, std=0.02), overwrite=True).version
            server.signal(signal.SIGHUP)
            wait_for(lambda v=old, u=server.url: httpx.get(f"{u}/tasks/big", timeout=30).json()["version"] == v, 30,
                     "the re-scan")
    print(f"{kind}: one registration took {took:.2f} s; kills: {outcomes}")
