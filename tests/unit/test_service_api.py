"""Every route and error code through FastAPI's TestClient, on a real tiny backbone and a real store."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from repadapter import LocalStore, TaskBundle
from repadapter.adapter import AdapterWeights
from service.app import create_app
from service.settings import Settings
from tests.servicekit import (
    TINY_ARCH,
    TINY_OPTIONS,
    Model,
    answers,
    archive,
    assert_predictions,
    bundle_parts,
    encode,
    multipart_bundle,
    stored,
    wait_for,
)

ADMIN, READER = "admin-token-for-tests", "reader-token-for-tests"
STORED = {"a": 1, "b": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load(TINY_ARCH, **TINY_OPTIONS)


@pytest.fixture(scope="module")
def bundles(model) -> dict[str, TaskBundle]:
    out = {name: model.bundle(name, seed) for name, seed in STORED.items()}
    out["probe"] = model.bundle("probe", 3, adapters=False, classes=4)
    return out


@pytest.fixture(scope="module")
def images(photos) -> list[bytes]:
    return [encode(photos[0], "JPEG", (96, 72)), encode(photos[1], "PNG", (64, 80)), encode(photos[2], "JPEG")]


def start(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "readiness")
        yield client


def tiny_settings(store: Path, **kw: object) -> Settings:
    return Settings(backbone=TINY_ARCH, backbone_options=TINY_OPTIONS, store=store, max_delay_ms=2.0, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory, bundles) -> LocalStore:
    return stored(tmp_path_factory.mktemp("api") / "store", bundles.values())


@pytest.fixture(scope="module")
def client(store) -> Iterator[TestClient]:
    """Open app (no tokens) over the shared store, re-scanning it every 0.2 s."""
    yield from start(tiny_settings(store.root, store_poll_s=0.2))


@pytest.fixture(scope="module")
def strict(tmp_path_factory) -> Iterator[TestClient]:
    """Tokens and small limits; its own (empty) store: only the builtin task."""
    yield from start(tiny_settings(
        tmp_path_factory.mktemp("strict") / "store", admin_token=ADMIN, classify_token=READER,
        max_image_bytes=30_000, max_image_pixels=100 * 100, max_images_per_request=3, max_queue_images=2,
        store_poll_s=0,
    ))


def files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"img{i}.bin", b, "application/octet-stream")) for i, b in enumerate(blobs)]


def error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert body["detail"]
    return body["detail"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def metric(client: TestClient, name: str, default: float | None = None, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    if default is None:
        raise AssertionError(f"no sample {name}{labels}")
    return default


# ---- classification -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["a", "b", "probe"])
def test_classify_multipart_equals_offline_merged(client, model, bundles, images, task):
    r = client.post(f"/classify?task={task}&top_k=3", files=files(*images))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["task"], body["task_version"]) == (task, 1)
    assert [x["filename"] for x in body["results"]] == ["img0.bin", "img1.bin", "img2.bin"]
    assert_predictions(answers(body), model.predict(bundles[task], images, top_k=3))
    assert sum(body["batch_sizes"]) >= 3
    assert set(body["modes"]) <= {"merged", "mixed"}
    t = body["timings"]
    assert t["total_ms"] >= t["inference_ms"] > 0
    assert t["decode_ms"] > 0
    assert t["queue_ms"] >= 0


def test_classify_raw_image_body(client, model, bundles, images):
    r = client.post("/classify?task=a", content=images[0], headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["filename"] is None
    assert_predictions(answers(r.json()), model.predict(bundles["a"], images[:1]))


def test_top_k_is_capped_at_the_tasks_labels(client):
    r = client.post("/classify?task=probe&top_k=50", files=files(encode(Image.new("RGB", (40, 40)))))
    assert r.status_code == 200
    assert len(r.json()["results"][0]["predictions"]) == 4
    scores = [p["score"] for p in r.json()["results"][0]["predictions"]]
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    assert scores == sorted(scores, reverse=True)


def test_any_image_mode_and_exif_orientation(client, model, bundles, photos):
    rgb = photos[0].resize((90, 60))
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rgb.save(rotated, "JPEG", exif=exif)
    blobs = [encode(rgb.convert("RGBA"), "PNG"), encode(rgb.convert("L"), "PNG"), encode(rgb.convert("CMYK"), "JPEG"),
             encode(rgb.convert("P"), "GIF"), rotated.getvalue(), encode(rgb, "WEBP")]
    r = client.post("/classify?task=a", files=files(*blobs))
    assert r.status_code == 200, r.text
    # the reference decodes with EXIF applied: a 90x60 image shown as 60x90 predicts differently unrotated
    assert_predictions(answers(r.json()), model.predict(bundles["a"], blobs))


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"url": "/classify?task=nope", "files": files(b"x")}, 404, "task_not_found"),
    ({"url": "/classify?task=a", "content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
     "unsupported_media"),
    ({"url": "/classify?task=a", "content": b"\x89PNG garbage", "headers": {"Content-Type": "image/png"}}, 415,
     "unsupported_media"),
    ({"url": "/classify?task=a", "content": b"", "headers": {"Content-Type": "image/png"}}, 415, "unsupported_media"),
    ({"url": "/classify?task=a", "files": files(b"not an image")}, 415, "unsupported_media"),
    ({"url": "/classify?task=a", "files": [("images", ("x.png", b"x", "image/png"))]}, 422, "malformed_request"),
    ({"url": "/classify?task=a", "data": {"files": "not-a-file"}, "files": [("files", ("f", b"", "x/y"))]}, 422,
     "malformed_request"),
    ({"url": "/classify?task=a", "content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}},
     422, "malformed_request"),
    ({"url": "/classify?task=a&top_k=0", "files": files(b"x")}, 422, "invalid_request"),
    ({"url": "/classify?task=a&top_k=many", "files": files(b"x")}, 422, "invalid_request"),
    ({"url": "/classify", "files": files(b"x")}, 422, "invalid_request"),
])
def test_classify_errors(client, kwargs, status, code):
    error(client.post(**kwargs), status, code)


def test_request_validation_errors_name_the_field_not_its_value(client):
    r = client.post("/classify", params={"task": "imagenet", "top_k": "abc123secret"})
    error(r, 422, "invalid_request")
    assert "abc123secret" not in r.text
    assert r.json()["detail"].startswith("query.top_k: Input should be a valid integer")


def test_error_names_the_offending_image(client, images):
    detail = error(client.post("/classify?task=a", files=[*files(images[0]), ("files", ("bad.jpg", b"xx", "a/b"))]),
                   415, "unsupported_media")
    assert detail == ("image 1 (bad.jpg): not a decodable image: unknown or unsupported format (accepted: JPEG, "
                      "PNG, GIF, WEBP, BMP, TIFF, PPM, AVIF)")


def test_limits_give_413(strict, images):
    big = encode(Image.effect_noise((200, 200), 64).convert("RGB"), "PNG")  # > 30 kB
    assert "bytes" in error(strict.post("/classify?task=imagenet", files=files(big), headers=auth(READER)),
                            413, "payload_too_large")
    wide = encode(Image.new("RGB", (400, 300)), "PNG")  # small file, 120k pixels > 10k
    assert "pixels" in error(strict.post("/classify?task=imagenet", files=files(wide), headers=auth(READER)),
                             413, "payload_too_large")
    raw = strict.post("/classify?task=imagenet", content=big, headers={"Content-Type": "image/png", **auth(READER)})
    error(raw, 413, "payload_too_large")
    small = encode(Image.new("RGB", (50, 50)), "PNG")
    four = strict.post("/classify?task=imagenet", files=files(*[small] * 4), headers=auth(READER))
    assert "at most 3" in error(four, 413, "payload_too_large")


def test_backpressure_gives_503_with_retry_after(strict):
    small = encode(Image.new("RGB", (50, 50)), "PNG")
    r = strict.post("/classify?task=imagenet", files=files(*[small] * 3), headers=auth(READER))
    error(r, 503, "queue_full")
    assert r.headers["Retry-After"] == "1"
    assert strict.post("/classify?task=imagenet", files=files(small, small), headers=auth(READER)).status_code == 200


def test_classification_token(strict):
    body = {"files": files(encode(Image.new("RGB", (50, 50)), "PNG"))}
    r = strict.post("/classify?task=imagenet", **body)
    error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    error(strict.post("/classify?task=imagenet", headers={"Authorization": "Basic eDp5"}, **body), 401, "unauthorized")
    error(strict.post("/classify?task=imagenet", headers=auth("wrong"), **body), 403, "forbidden")
    for token in (READER, ADMIN):
        assert strict.post("/classify?task=imagenet", headers=auth(token), **body).status_code == 200
    assert strict.get("/tasks", headers=auth(READER)).status_code == 200
    error(strict.get("/tasks"), 401, "unauthorized")


def test_management_token(strict, model):
    parts = multipart_bundle(model.bundle("guarded", 5))
    error(strict.post("/tasks", files=parts), 401, "unauthorized")
    error(strict.post("/tasks", files=parts, headers=auth(READER)), 403, "forbidden")
    error(strict.delete("/tasks/imagenet", headers=auth(READER)), 403, "forbidden")
    assert strict.post("/tasks", files=parts, headers=auth(ADMIN)).status_code == 201
    assert strict.delete("/tasks/guarded", headers=auth(ADMIN)).status_code == 204


def test_unknown_route_and_method(client):
    error(client.get("/nowhere"), 404, "not_found")
    error(client.put("/classify?task=a"), 405, "method_not_allowed")


def test_engine_failure_is_a_500_and_the_worker_survives(client, monkeypatch):
    engine = client.app.state.runtime.engine

    def broken(_x):
        raise RuntimeError("device lost")

    small = files(encode(Image.new("RGB", (50, 50)), "PNG"))
    monkeypatch.setattr(engine.executor, "forward", broken)
    assert "device lost" in error(client.post("/classify?task=a", files=small), 500, "inference_failed")
    monkeypatch.undo()
    assert client.post("/classify?task=a", files=small).status_code == 200
    assert metric(client, "repserve_engine_errors_total") == 1


# ---- tasks --------------------------------------------------------------------------------------------


def test_list_and_describe_tasks(client):
    listed = client.get("/tasks").json()["tasks"]
    names = [t["name"] for t in listed]
    assert {"a", "b", "imagenet", "probe"} <= set(names)
    assert names == sorted(names)
    builtin = next(t for t in listed if t["name"] == "imagenet")
    assert (builtin["builtin"], builtin["version"], builtin["num_labels"], builtin["labels"]) == (True, 0, 1000, None)
    assert builtin["resident"] == "device"  # pinned: served from memory, never from the store
    a = client.get("/tasks/a").json()
    assert (a["version"], a["labels"], a["adapter"]["hidden"], a["method"]) == (1, [f"a-{i}" for i in range(5)], 8,
                                                                                "repadapter")
    assert a["resident"] in ("device", "host", "store")
    assert client.get("/tasks/probe").json()["adapter"]["hidden"] == 0
    error(client.get("/tasks/nope"), 404, "task_not_found")


def test_register_serves_at_once_and_overwrite_makes_a_new_version(client, store, model, images):
    first, second = model.bundle("fresh", 21), model.bundle("fresh", 22)
    r = client.post("/tasks", files=multipart_bundle(first))
    assert r.status_code == 201, r.text
    assert (r.json()["version"], r.headers["Location"]) == (1, "/tasks/fresh")
    got = client.post("/classify?task=fresh", files=files(*images)).json()
    assert got["task_version"] == 1
    assert_predictions(answers(got), model.predict(first, images))

    error(client.post("/tasks", files=multipart_bundle(second)), 409, "task_exists")
    assert store.versions("fresh") == [1]
    r = client.post("/tasks?overwrite=true", files=multipart_bundle(second))
    assert (r.status_code, r.json()["version"]) == (201, 2)
    got = client.post("/classify?task=fresh", files=files(*images)).json()
    assert got["task_version"] == 2
    assert_predictions(answers(got), model.predict(second, images))
    assert store.versions("fresh") == [1, 2]


@pytest.mark.parametrize(("kind", "prefix"), [("zip", ""), ("tar", "fashion/v000001/"), ("tar.gz", "x/")])
def test_register_bundle_archives(client, model, images, kind, prefix):
    bundle = model.bundle(f"arch-{kind.replace('.', '')}", 31)
    blob = archive(bundle_parts(bundle), kind, prefix)
    r = client.post("/tasks", files=[("bundle", (f"b.{kind}", blob, "application/octet-stream"))])
    assert r.status_code == 201, r.text
    got = client.post(f"/classify?task={bundle.name}", files=files(images[0])).json()
    assert_predictions(answers(got), model.predict(bundle, images[:1]))


def _bad(model, what: str) -> list:
    """Multipart parts of a bundle broken in one way (tensors built with the real core)."""
    b = model.bundle("broken", 41)
    manifest, tensors = b.serialize()
    m = json.loads(manifest)
    if what == "fingerprint":
        m["backbone"]["fingerprint"] = "0" * 32
    elif what == "checksum":
        m["tensors_sha256"] = "f" * 64
    elif what == "labels":
        m["labels"] = m["labels"][:-1]
    elif what == "input_size":
        m["preprocess"]["input_size"] = [3, 96, 96]  # a fixed-size 64 px ViT cannot take it
    elif what in ("nan", "site", "shape"):
        if what == "nan":
            b.head_bias[0] = float("nan")
        elif what == "site":
            w = next(iter(b.adapters.values()))
            b.adapters["blocks.9.adapter_attn"] = AdapterWeights(*(t.clone() for t in w.tensors().values()),
                                                                 w.groups, w.scale)
        else:
            w = next(iter(b.adapters.values()))
            b.adapters[next(iter(b.adapters))] = AdapterWeights(w.weight_a[:, :-1], w.bias_a, w.weight_b, w.bias_b,
                                                                w.groups, w.scale)
        manifest, tensors = TaskBundle(b.manifest.model_copy(update={"tensors_sha256": ""}), b.adapters,
                                       b.head_weight, b.head_bias).serialize()
        m = json.loads(manifest)
        m["tensors_sha256"] = ""
    elif what == "json":
        return [("manifest", ("m.json", b"{not json", "application/json")), ("tensors", ("t", tensors, "x/y"))]
    elif what == "safetensors":
        m["tensors_sha256"] = ""
        tensors = b"\x00" * 64
    return [("manifest", ("m.json", json.dumps(m).encode(), "application/json")), ("tensors", ("t", tensors, "x/y"))]


@pytest.mark.parametrize(("what", "status", "code", "says"), [
    ("fingerprint", 409, "backbone_mismatch", "trained for backbone"),
    ("checksum", 422, "checksum_mismatch", "sha256"),
    ("labels", 422, "invalid_bundle", "outputs but 4 labels"),
    ("nan", 422, "invalid_bundle", "not finite"),
    ("site", 422, "invalid_bundle", "sites this backbone does not have"),
    ("shape", 422, "invalid_bundle", "weight_a has shape"),
    ("input_size", 422, "invalid_bundle", "cannot take input size"),
    ("json", 422, "invalid_bundle", "invalid manifest"),
    ("safetensors", 422, "invalid_bundle", "not a safetensors file"),
])
def test_invalid_bundles_change_nothing(client, store, model, what, status, code, says):
    before = (client.get("/tasks").json(), [(e.name, e.version) for e in store.list()])
    assert says in error(client.post("/tasks", files=_bad(model, what)), status, code)
    assert (client.get("/tasks").json(), [(e.name, e.version) for e in store.list()]) == before


@pytest.mark.parametrize(("parts", "says"), [
    ([("manifest", ("m.json", b"{}", "application/json"))], "send `manifest` and `tensors`"),
    ([("bundle", ("b.zip", b"PK", "x/y")), ("manifest", ("m.json", b"{}", "x/y"))], "or one `bundle`"),
    ([("bundle", ("b.zip", b"definitely not an archive", "x/y"))], "neither a zip nor a tar"),
    ([("bundle", ("b.zip", archive({"manifest.json": b"{}", "a/manifest.json": b"{}", "adapter.safetensors": b""}),
                  "x/y"))], "exactly one manifest.json"),
    ([("bundle", ("b.tar", archive({"manifest.json": b"{}"}, "tar"), "x/y"))], "exactly one adapter.safetensors"),
    ([("tensors", ("t", b"", "x/y")), ("tensors", ("t", b"", "x/y")), ("manifest", ("m", b"", "x/y"))], "at most once"),
])
def test_malformed_registrations(client, parts, says):
    assert says in error(client.post("/tasks", files=parts), 422, "malformed_request")


def test_delete_stops_serving_and_removes_from_the_store(client, store, model):
    assert client.post("/tasks", files=multipart_bundle(model.bundle("doomed", 51))).status_code == 201
    r = client.delete("/tasks/doomed")
    assert (r.status_code, r.content) == (204, b"")
    assert "doomed" not in [e.name for e in store.list()]
    error(client.get("/tasks/doomed"), 404, "task_not_found")
    error(client.post("/classify?task=doomed", files=files(b"x")), 404, "task_not_found")
    error(client.delete("/tasks/doomed"), 404, "task_not_found")


def test_conditional_delete_deletes_only_the_version_named(client, store, model):
    assert client.post("/tasks", files=multipart_bundle(model.bundle("guarded-v", 52))).status_code == 201
    replacement = multipart_bundle(model.bundle("guarded-v", 53))
    assert client.post("/tasks?overwrite=true", files=replacement).status_code == 201
    detail = error(client.delete("/tasks/guarded-v", params={"version": 1}), 409, "version_mismatch")
    assert detail == "task 'guarded-v' is at version 2, not 1 (replaced since you looked?): nothing changed"
    assert client.get("/tasks/guarded-v").json()["version"] == 2
    assert store.versions("guarded-v") == [1, 2]
    error(client.delete("/tasks/guarded-v", params={"version": 0}), 422, "invalid_request")
    r = client.delete("/tasks/guarded-v", params={"version": 2})
    assert (r.status_code, r.content) == (204, b"")
    assert store.versions("guarded-v") == []
    error(client.delete("/tasks/guarded-v", params={"version": 2}), 404, "task_not_found")
    error(client.delete("/tasks/never-was", params={"version": 1}), 404, "task_not_found")


def test_conditional_delete_holds_off_registrations(client, model):
    """The version check and the deletion are one step: a registration arriving between them waits."""
    registry = client.app.state.runtime.registry
    assert client.post("/tasks", files=multipart_bundle(model.bundle("raced", 54))).status_code == 201
    replaced = threading.Event()

    def replace() -> None:
        registry.register(model.bundle("raced", 55).pack(), overwrite=True)
        replaced.set()

    with registry.at_version("raced", 1):
        writer = threading.Thread(target=replace)
        writer.start()
        assert not replaced.wait(0.3)  # blocked on the write lock held here
        client.app.state.runtime.delete("raced")  # re-entrant: the block's own change
    writer.join(10)
    assert replaced.is_set()
    assert client.get("/tasks/raced").json()["version"] == 1  # registered after the deletion: a new task


def test_builtin_task_can_be_overridden_but_not_deleted(client, model, images):
    error(client.delete("/tasks/imagenet"), 409, "task_builtin")
    override = model.bundle("imagenet", 61)
    error(client.post("/tasks", files=multipart_bundle(override)), 409, "task_exists")
    assert client.post("/tasks?overwrite=true", files=multipart_bundle(override)).json()["version"] == 1
    got = client.post("/classify?task=imagenet", files=files(images[0])).json()
    assert_predictions(answers(got), model.predict(override, images[:1]))
    assert client.delete("/tasks/imagenet").status_code == 204
    again = client.get("/tasks/imagenet").json()
    assert (again["builtin"], again["version"], again["num_labels"]) == (True, 0, 1000)


def test_store_changes_appear_without_restart(client, store, model, images):
    bundle = model.bundle("polled", 71)
    store.put(bundle)  # as the training CLI or another replica would
    wait_for(lambda: client.get("/tasks/polled").status_code == 200, 10, "the poll to list the task")
    assert client.get("/tasks/polled").json()["resident"] == "store"  # listed from its manifest only
    got = client.post("/classify?task=polled", files=files(images[0])).json()
    assert_predictions(answers(got), model.predict(bundle, images[:1]))
    assert got["timings"]["load_ms"] > 0
    assert client.get("/tasks/polled").json()["resident"] == "device"
    store.delete("polled")
    wait_for(lambda: client.get("/tasks/polled").status_code == 404, 10, "the poll to drop the task")


def test_corrupt_stored_version_fails_alone_at_first_load_and_is_not_reloaded(client, store, model, images):
    """Listing reads manifests only, so a corrupt tensor file is found when the task is first loaded: that
    task answers 503 ``task_unavailable`` (counted once, never reloaded), every other task is unaffected."""
    store.put(model.bundle("flaky", 81))
    store.put(model.bundle("flaky", 82), overwrite=True)
    tensors = store.root / "flaky" / "v000002" / "adapter.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-4:] = b"\xff\xff\xff\xff"
    tensors.write_bytes(bytes(data))
    wait_for(lambda: client.get("/tasks/flaky").status_code == 200, 10, "the poll to list the task")
    assert client.get("/tasks/flaky").json()["version"] == 2
    before = metric(client, "repserve_store_errors_total", 0.0, reason="checksum_mismatch")
    for _ in range(3):
        r = client.post("/classify?task=flaky", files=files(images[0]))
        assert "sha256" in error(r, 503, "task_unavailable")
        assert "Retry-After" not in r.headers  # it stays broken until the store holds a new version
    assert metric(client, "repserve_store_errors_total", 0.0, reason="checksum_mismatch") == before + 1
    assert client.get("/tasks/flaky").json()["resident"] == "store"
    ok = client.post("/classify?task=a", files=files(images[0]))
    assert ok.status_code == 200
    assert metric(client, "repserve_store_last_scan_timestamp_seconds") > 0


# ---- health, metrics, docs ----------------------------------------------------------------------------


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["device"] == "cpu"
    assert ready["policy"] == "auto"
    assert ready["costs"]["switch_s"] > 0


def test_liveness_fails_when_start_up_failed(client):
    runtime = client.app.state.runtime
    runtime.failure = "CheckpointError: cannot read checkpoint"
    try:
        assert "start-up failed" in error(client.get("/healthz"), 503, "unhealthy")
    finally:
        runtime.failure = None
    assert client.get("/healthz").status_code == 200


def test_not_ready_before_start_up(tmp_path):
    cold = TestClient(create_app(tiny_settings(tmp_path)))  # lifespan not run: nothing loaded
    assert cold.get("/healthz").status_code == 200
    error(cold.get("/readyz"), 503, "not_ready")
    error(cold.post("/classify?task=a", files=files(b"x")), 503, "not_ready")
    error(cold.get("/tasks"), 503, "not_ready")


def test_metrics(client, images):
    before = metric(client, "repserve_requests_total", task="a", code="200")
    for _ in range(2):
        client.post("/classify?task=a", files=files(images[0]))
    client.post("/classify?task=unseen", files=files(images[0]))
    assert metric(client, "repserve_requests_total", task="a", code="200") == before + 2
    assert metric(client, "repserve_requests_total", task="unknown", code="404") >= 1
    assert metric(client, "repserve_request_duration_seconds_count") >= before + 2
    assert metric(client, "repserve_queue_duration_seconds_count") >= 2
    assert metric(client, "repserve_batch_size_count", 0.0, mode="merged") + \
        metric(client, "repserve_batch_size_count", 0.0, mode="mixed") >= 2
    assert metric(client, "repserve_tasks_loaded") == len(client.get("/tasks").json()["tasks"])
    assert metric(client, "repserve_active_task", task="a") in (0.0, 1.0)
    assert metric(client, "repserve_task_switches_total") >= 1
    assert metric(client, "repserve_task_switch_duration_seconds_count") >= 1
    assert metric(client, "repserve_device_memory_bytes", kind="backbone") > 1e6
    assert metric(client, "repserve_device_memory_bytes", kind="pristine") > 0
    assert metric(client, "repserve_ready") == 1
    assert metric(client, "repserve_http_requests_total", handler="/classify", method="POST", code="200") >= 2
    assert "repserve_queue_depth" in client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_openapi_documents_every_route(client):
    spec = client.get("/openapi.json").json()
    assert {"/classify", "/tasks", "/tasks/{name}", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "image/*"}
    assert "ClassifyResponse" in json.dumps(spec["paths"]["/classify"]["post"]["responses"]["200"])
    assert "ErrorBody" in json.dumps(spec["paths"]["/classify"]["post"]["responses"]["404"])
    assert client.get("/docs").status_code == 200


def test_heads_are_float32_softmax(client):
    r = client.post("/classify?task=b&top_k=5", files=files(encode(Image.new("RGB", (40, 40), (9, 99, 199)))))
    scores = torch.tensor([p["score"] for p in r.json()["results"][0]["predictions"]])
    assert scores.sum().item() == pytest.approx(1.0, abs=1e-5)
