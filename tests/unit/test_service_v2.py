"""The Open Inference Protocol (KServe v2) routes through FastAPI's TestClient, on the embedded MobileNetV2 and a
copy of the shipped store: the protocol's JSON objects, both inputs in both encodings against /classify, and
every malformed request refused with the protocol's error body."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import JSONResponse

from repadapter.preprocess import PreprocessConfig, preprocess_batch
from service import __version__, oip
from service.app import create_app
from service.errors import error_body
from service.middleware import BodyDeadlineMiddleware
from service.settings import Settings
from tests.servicekit import encode, wait_for

REPO = Path(__file__).resolve().parents[2]
READER = "reader-token-for-tests"
TOL = 1e-5
INFER = "/v2/models/imagenet/infer"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def start(tmp: Path, **kw: Any) -> Iterator[TestClient]:
    store = tmp / "store"
    shutil.copytree(REPO / "adapters_store", store)
    with TestClient(create_app(Settings(store=str(store), store_poll_s=0, max_delay_ms=1.0, **kw))) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "readiness")
        yield client


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    yield from start(tmp_path_factory.mktemp("v2"), max_images_per_request=3)


@pytest.fixture(scope="module")
def cat(photos) -> bytes:
    return encode(photos[0], "JPEG")  # chelsea


@pytest.fixture(scope="module")
def cat_pixels(client, cat) -> torch.Tensor:
    """The cat preprocessed as the imagenet task says (GET /tasks/imagenet): ``[1, 3, 224, 224]``."""
    preprocess = PreprocessConfig.model_validate(client.get("/tasks/imagenet").json()["preprocess"])
    return preprocess_batch([cat], preprocess)


@pytest.fixture(scope="module")
def classified(client, cat) -> list[tuple[str, float]]:
    """/classify's answer for the cat: every class, best first."""
    r = client.post("/classify", params={"task": "imagenet", "top_k": 1000}, content=cat,
                    headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    return [(p["label"], p["score"]) for p in r.json()["results"][0]["predictions"]]


def labels(client) -> list[str]:
    return client.get("/tasks/imagenet").json()["labels"]


def bytes_input(*images: bytes) -> dict[str, Any]:
    return {"name": "image_bytes", "shape": [len(images)], "datatype": "BYTES",
            "data": [base64.b64encode(b).decode() for b in images]}


def tensor_input(x: torch.Tensor, nested: bool = False) -> dict[str, Any]:
    return {"name": "image", "shape": list(x.shape), "datatype": "FP32",
            "data": x.tolist() if nested else x.flatten().tolist()}


def binary_request(header: dict[str, Any], blob: bytes) -> tuple[bytes, dict[str, str | bytes]]:
    """Triton's binary tensor data extension: the JSON header, then ``blob``."""
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"}


def binary_input(name: str, shape: list[int], size: int) -> dict[str, Any]:
    """An input whose ``size`` bytes follow the JSON header."""
    return {"name": name, "shape": shape, "datatype": "FP32" if name == "image" else "BYTES",
            "parameters": {"binary_data_size": size}}


def refusal(r: Any) -> str:
    """The message of a 400 with the protocol's error body (nothing else in it)."""
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    return r.json()["error"]


def outputs(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in body["outputs"]}


def split_binary(content: bytes, header_length: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A binary response: its JSON header and each binary output's bytes."""
    header = json.loads(content[:header_length])
    blobs, offset = {}, header_length
    for o in header["outputs"]:
        if "data" in o:
            continue
        size = o["parameters"]["binary_data_size"]
        blobs[o["name"]] = content[offset:offset + size]
        offset += size
    assert offset == len(content)
    return header, blobs


def assert_probabilities(got: list[float] | np.ndarray, names: list[str], expected: list[tuple[str, float]]) -> None:
    """``got`` (in label order) equals /classify's scores within TOL, for every class."""
    by_label = dict(zip(names, np.asarray(got, dtype=np.float64).tolist(), strict=True))
    assert len(by_label) == len(expected) == 1000
    assert max(abs(by_label[label] - score) for label, score in expected) <= TOL


# ---- health and metadata -------------------------------------------------------------------------------------


def test_server_metadata_and_health(client):
    assert client.get("/v2").json() == {"name": "repserve", "version": __version__,
                                        "extensions": ["binary_tensor_data"]}
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/imagenet/ready",
                 "/v2/models/digits/versions/1/ready"):
        r = client.get(path)
        assert (r.status_code, r.content) == (200, b""), path


@pytest.mark.parametrize("path", ["/v2/models/imagenet", "/v2/models/imagenet/versions/1"])
def test_model_metadata(client, path):
    assert client.get(path).json() == {
        "name": "imagenet", "versions": ["1"], "platform": "repserve_repadapter",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
                   {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]},
                    {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]}],
    }


def test_metadata_of_a_task_from_the_store(client):
    body = client.get("/v2/models/digits").json()
    assert (body["name"], body["versions"]) == ("digits", ["1"])
    assert body["outputs"][0]["shape"] == [-1, len(client.get("/tasks/digits").json()["labels"])]


@pytest.mark.parametrize(("method", "path", "error"), [
    ("GET", "/v2/models/nope", "no task 'nope' (GET /tasks lists the served tasks)"),
    ("GET", "/v2/models/nope/ready", "no task 'nope' (GET /tasks lists the served tasks)"),
    ("POST", "/v2/models/nope/infer", "no task 'nope' (GET /tasks lists the served tasks)"),
    ("GET", "/v2/models/imagenet/versions/2", "task 'imagenet' has no version '2'; version 1 is served"),
    ("GET", "/v2/models/imagenet/versions/x/ready", "task 'imagenet' has no version 'x'; version 1 is served"),
    ("POST", "/v2/models/imagenet/versions/0/infer", "task 'imagenet' has no version '0'; version 1 is served"),
    ("GET", "/v2/repository/index", "Not Found"),
])
def test_unknown_model_or_version_is_404(client, method, path, error):
    r = client.request(method, path, json={"inputs": []})
    assert (r.status_code, r.json()) == (404, {"error": error})


def test_405_has_the_protocols_body_and_other_routes_keep_theirs(client):
    r = client.put(INFER)
    assert (r.status_code, r.headers["allow"], r.json()) == (405, "POST", {"error": "Method Not Allowed"})
    assert client.put("/classify").json() == {"error": "method_not_allowed", "detail": "Method Not Allowed"}


# ---- inference ------------------------------------------------------------------------------------------------


def test_bytes_input_answers_as_classify(client, cat, classified):
    r = client.post(INFER, json={"id": "req-1", "inputs": [bytes_input(cat)], "parameters": {"top_k": 3}})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("imagenet", "1", "req-1")
    out = outputs(body)
    assert (out["probabilities"]["shape"], out["probabilities"]["datatype"]) == ([1, 1000], "FP32")
    assert out["labels"] == {"name": "labels", "shape": [1, 3], "datatype": "BYTES",
                             "data": [label for label, _ in classified[:3]]}
    assert classified[0][0] == "Egyptian cat"
    assert_probabilities(out["probabilities"]["data"], labels(client), classified)


@pytest.mark.parametrize("nested", [False, True])
def test_tensor_input_answers_as_classify(client, cat_pixels, classified, nested):
    r = client.post(INFER, json={"inputs": [tensor_input(cat_pixels, nested)]})
    assert r.status_code == 200, r.text
    out = outputs(r.json())
    assert out["labels"]["data"] == [label for label, _ in classified[:5]]  # default top_k: 5, as /classify
    assert_probabilities(out["probabilities"]["data"], labels(client), classified)


def test_binary_inputs_and_outputs(client, cat, cat_pixels, classified):
    """tritonclient's default encoding: inputs after the JSON header, outputs after the response's."""
    raw = cat_pixels.numpy().astype("<f4").tobytes()
    files = struct.pack("<I", len(cat)) + cat
    for tensor, blob in ((binary_input("image", [1, 3, 224, 224], len(raw)), raw),
                         (binary_input("image_bytes", [1, 1], len(files)), files)):
        body, headers = binary_request({"inputs": [tensor], "parameters": {"binary_data_output": True, "top_k": 2},
                                        "outputs": [{"name": "labels"}, {"name": "probabilities"}]}, blob)
        r = client.post(INFER, content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        header, blobs = split_binary(r.content, int(r.headers["inference-header-content-length"]))
        assert [(o["name"], o["shape"], o["datatype"]) for o in header["outputs"]] == [
            ("labels", [1, 2], "BYTES"), ("probabilities", [1, 1000], "FP32")]
        names = [label for label, _ in classified[:2]]
        assert blobs["labels"] == b"".join(struct.pack("<I", len(n)) + n.encode() for n in names)
        assert_probabilities(np.frombuffer(blobs["probabilities"], dtype="<f4"), labels(client), classified)


def test_requested_outputs_and_their_encoding(client, cat, classified):
    r = client.post(INFER, json={"inputs": [bytes_input(cat, cat)], "parameters": {"top_k": 1},
                                 "outputs": [{"name": "labels"}]})
    assert r.json()["outputs"] == [{"name": "labels", "shape": [2, 1], "datatype": "BYTES",
                                    "data": [classified[0][0]] * 2}]
    # one output binary, the other JSON
    binary = {"name": "probabilities", "parameters": {"binary_data": True}}
    r = client.post(INFER, json={"inputs": [bytes_input(cat)], "parameters": {"top_k": 1},
                                 "outputs": [{"name": "labels"}, binary]})
    header, blobs = split_binary(r.content, int(r.headers["inference-header-content-length"]))
    assert outputs(header)["labels"]["data"] == [classified[0][0]]
    assert np.frombuffer(blobs["probabilities"], dtype="<f4").shape == (1000,)


def test_top_k_is_capped_at_the_tasks_labels(client, cat):
    n = len(client.get("/tasks/digits").json()["labels"])
    r = client.post("/v2/models/digits/infer", json={"inputs": [bytes_input(cat)], "parameters": {"top_k": 999}})
    out = outputs(r.json())
    assert out["labels"]["shape"] == [1, n]
    assert abs(sum(out["probabilities"]["data"]) - 1) < 1e-4


# ---- refusals -------------------------------------------------------------------------------------------------

PX = 3 * 224 * 224


@pytest.mark.parametrize(("request_body", "error"), [
    ({"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP16", "data": [0.0] * PX}]},
     "input 'image' is FP32, not FP16"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}]},
     "input 'image': shape [1, 3, 32, 32]; this task takes [N, 3, 224, 224]"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [0.0] * (PX - 1)}]},
     f"input 'image': {PX - 1} values; shape [1, 3, 224, 224] holds {PX}"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [True] * PX}]},
     "input 'image': data must be an array of numbers"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [[0.0], [0.0, 1.0]]}]},
     "input 'image': data must be a (flat or evenly nested) array of numbers"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [1e6] * PX}]},
     "input 'image': values must be finite and within ±10000 (normalized pixels)"),
    ({"inputs": [{"name": "image", "shape": [0, 3, 224, 224], "datatype": "FP32", "data": []}]},
     "input 'image': shape [0, 3, 224, 224] holds no image"),
    ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]},
     "unknown input 'pixels'; send 'image' (FP32 [N, 3, 224, 224]) or 'image_bytes' (BYTES [N]: encoded images)"),
    ({"inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES", "data": ["AA=="]}]},
     "input 'image_bytes': 1 elements; shape [2] holds 2"),
    ({"inputs": [{"name": "image_bytes", "shape": [1, 2], "datatype": "BYTES", "data": ["AA==", "AA=="]}]},
     "input 'image_bytes': shape [1, 2]; send [N] (or [N, 1]) images"),
    ({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]},
     "input 'image_bytes': element 0 is not base64 (encoded image bytes)"),
    ({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [1]}]},
     "input 'image_bytes': data must be an array of base64 strings (encoded images)"),
    ({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES"}]},
     "input 'image_bytes': send its `data`, or binary_data_size bytes after the header"),
    ({"inputs": [bytes_input(b"x")], "outputs": [{"name": "logits"}]},
     "unknown output 'logits'; this model has 'probabilities' and 'labels'"),
])
def test_bad_input_is_400_with_the_protocols_body(client, request_body, error):
    assert refusal(client.post(INFER, json=request_body)) == error


@pytest.mark.parametrize(("request_body", "fragment"), [
    ({"inputs": []}, "inputs: List should have at least 1 item"),
    ({"inputs": [bytes_input(b"x"), bytes_input(b"y")]}, "inputs: List should have at most 1 item"),
    ({"inputs": [bytes_input(b"x")], "parameters": {"top_k": 0}},
     "parameters.top_k: Input should be greater than or equal to 1"),
    ({"inputs": [{"name": "image", "shape": ["1"], "datatype": "FP32", "data": [0.0]}]},
     "inputs.0.shape.0: Input should be a valid integer"),
    ([], "Input should be an object"),
])
def test_invalid_request_objects_are_400(client, request_body, fragment):
    error = refusal(client.post(INFER, json=request_body))
    assert error.startswith("invalid inference request: ")
    assert fragment in error, error


def test_an_undecodable_image_is_400_naming_it(client):
    assert refusal(client.post(INFER, json={"inputs": [bytes_input(b"not an image")]})).startswith(
        "input 'image_bytes': image 0")


@pytest.mark.parametrize(("header", "blob", "length", "error"), [
    ({"inputs": [binary_input("image", [1, 3, 224, 224], 8)]},
     b"\0" * 8, None, "input 'image': 8 bytes; shape [1, 3, 224, 224] is 602112 (FP32)"),
    ({"inputs": [binary_input("image", [1, 3, 224, 224], 9)]},
     b"\0" * 8, None, "input 'image': binary_data_size is 9 but 8 bytes follow the JSON header"),
    ({"inputs": [binary_input("image", [1, 3, 224, 224], 4 * PX)]}, np.full(PX, np.nan, dtype="<f4").tobytes(),
     None, "input 'image': values must be finite and within ±10000 (normalized pixels)"),
    ({"inputs": [bytes_input(b"x")]}, b"\0", None,
     "1 bytes follow the JSON header but no input has a binary_data_size"),
    ({"inputs": [binary_input("image_bytes", [1], 6)]},
     struct.pack("<I", 5) + b"ab", None, "input 'image_bytes': element 0 is 5 bytes; 2 remain"),
    ({"inputs": [binary_input("image_bytes", [1], 2)]},
     b"ab", None, "input 'image_bytes': the binary data ends inside an element's length"),
    ({"inputs": [bytes_input(b"x")]}, b"", "10000000", "Inference-Header-Content-Length must be a byte count within"),
    ({"inputs": [bytes_input(b"x")]}, b"", "-1", "Inference-Header-Content-Length must be a byte count within"),
    ({"inputs": [bytes_input(b"x")]}, b"", "²".encode("latin-1"),  # a digit to str.isdigit, not to int()
     "Inference-Header-Content-Length must be a byte count within"),
])
def test_bad_binary_data_is_400(client, header, blob, length, error):
    body, headers = binary_request(header, blob)
    if length is not None:
        headers["Inference-Header-Content-Length"] = length
    message = refusal(client.post(INFER, content=body, headers=headers))
    assert message.startswith(error), message


def test_too_many_images_is_413(client, cat):
    r = client.post(INFER, json={"inputs": [bytes_input(cat, cat, cat, cat)]})
    assert (r.status_code, r.json()) == (413, {"error": "4 images; at most 3 per request"})


# ---- body limits, parse concurrency and the deadline ------------------------------------------------------------


def test_body_limits_are_what_the_tasks_most_images_need():
    """imagenet at the defaults (64 images, 20 MB files): base64 files are the largest body; a JSON tensor may hold
    its 64 images' numbers (and a nested tensor's arrays), not more."""
    limits = oip.BodyLimits.of((3, 224, 224), 64, 20 << 20)
    assert limits.body == (1 << 20) + 64 * (((20 << 20) + 2) // 3 * 4 + 8)
    assert limits.values == 64 * (3 * 224 * 224 + 3 * 224 + 3 + 1) + 4096
    small = oip.BodyLimits.of((3, 224, 224), 3, 1000)  # small files: the JSON tensor is the largest body
    assert small.body == (1 << 20) + 3 * 3 * 224 * 224 * 26


def oversized_tensor(images: int) -> bytes:
    """A JSON FP32 tensor of ``images`` imagenet images of zeros, at 2 bytes a number (what makes Python floats
    16 times the body)."""
    head = json.dumps({"name": "image", "shape": [images, 3, 224, 224], "datatype": "FP32"})[:-1]
    return (b'{"inputs": [' + head.encode() + b', "data": [' + b"0," * (images * 3 * 224 * 224 - 1) + b"0]}]}")


@pytest.fixture
def parses(monkeypatch) -> list[int]:
    """Every call of oip.parse_request from now on (its JSON size), made through to the real one."""
    calls: list[int] = []
    real = oip.parse_request

    def recorded(body: bytes, json_size: int, *args: Any) -> oip.ParsedRequest:
        calls.append(json_size)
        return real(body, json_size, *args)

    monkeypatch.setattr(oip, "parse_request", recorded)
    return calls


def test_an_oversized_json_tensor_is_413_before_parsing(client, parses):
    """4 images where the task takes 3: refused on the body's bytes, before one number becomes a Python float."""
    start = time.perf_counter()
    r = client.post(INFER, content=oversized_tensor(4), headers={"content-type": "application/json"})
    seconds = time.perf_counter() - start
    values = 3 * (3 * 224 * 224 + 3 * 224 + 3 + 1) + 4096
    assert (r.status_code, r.json()) == (413, {"error": f"the request holds more than {values} JSON values, more "
                                                        "than this task's most images can"})
    assert parses == []
    assert seconds < 2.0  # counting bytes, not parsing (a parse of this body takes seconds and GBs)


def test_a_declared_body_over_the_limit_is_413_before_reading(client, parses):
    limit = oip.BodyLimits.of((3, 224, 224), 3, 20 << 20).body
    r = client.post(INFER, content=b"{}", headers={"content-type": "application/json",
                                                   "content-length": str(limit + 1)})
    assert (r.status_code, r.json()) == (413, {"error": f"the request body is {limit + 1} bytes, the limit is {limit}"})
    assert parses == []


def test_a_large_json_header_before_binary_data_is_413(client, parses):
    header = {"inputs": [binary_input("image_bytes", [1], 5)], "id": "x" * (1 << 20)}
    body, headers = binary_request(header, b"\x01\x00\x00\x00x")
    r = client.post(INFER, content=body, headers=headers)
    assert (r.status_code, r.json()) == (413, {"error": f"the JSON header is {len(body) - 5} bytes before binary "
                                                        f"data; at most {1 << 20}"})
    assert parses == []


def test_a_tensor_of_the_tasks_most_images_is_parsed(client, cat_pixels, classified, parses):
    """The largest JSON tensor the task takes (3 images, nested) passes the value bound and answers as /classify."""
    x = cat_pixels.expand(3, -1, -1, -1).contiguous()
    r = client.post(INFER, json={"inputs": [tensor_input(x, nested=True)]})
    assert r.status_code == 200, r.text
    assert len(parses) == 1
    probabilities = outputs(r.json())["probabilities"]
    assert probabilities["shape"] == [3, 1000]
    assert_probabilities(probabilities["data"][2000:], labels(client), classified)


def test_parses_share_the_decode_slots(client, cat, monkeypatch):
    """At most ``decode_concurrency`` requests parse at once, holding /classify's decode slots while they do."""
    real, lock = oip.parse_request, threading.Lock()
    running, peak, slots_held = 0, 0, []

    def slow(*args: Any) -> oip.ParsedRequest:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        slots_held.append(client.app.state.decode_slots.borrowed_tokens)
        time.sleep(0.2)
        with lock:
            running -= 1
        return real(*args)

    monkeypatch.setattr(oip, "parse_request", slow)
    request = {"inputs": [bytes_input(cat)], "outputs": [{"name": "labels"}], "parameters": {"top_k": 1}}
    statuses: list[int] = []
    workers = [threading.Thread(target=lambda: statuses.append(client.post(INFER, json=request).status_code))
               for _ in range(10)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    slots = client.app.state.settings.decode_concurrency
    assert (statuses, peak) == ([200] * 10, slots)
    assert min(slots_held) >= 1  # the parse holds one of /classify's decode slots
    assert client.app.state.decode_slots.total_tokens == slots


@pytest.fixture
def one_slot(tmp_path) -> Iterator[TestClient]:
    yield from start(tmp_path, request_timeout_s=0.5, decode_concurrency=1)


def test_nothing_is_parsed_after_the_deadline(one_slot, cat, monkeypatch):
    """One decode slot, a parse that outlives the 0.5 s deadline: both requests get 503 timeout, and the one that
    waited for the slot is never parsed (its deadline passed while waiting)."""
    calls: list[float] = []

    def slow(body: bytes, json_size: int, shape: tuple[int, int, int], check: Any) -> oip.ParsedRequest:
        calls.append(time.monotonic())
        time.sleep(0.8)
        check()  # what the real parse does between its steps: past the deadline, it stops here
        raise AssertionError("parsed past the deadline")

    monkeypatch.setattr(oip, "parse_request", slow)
    request = {"inputs": [bytes_input(cat)]}
    answers: list[Any] = []
    workers = [threading.Thread(target=lambda: answers.append(one_slot.post(INFER, json=request))) for _ in range(2)]
    for w in workers:
        w.start()
        time.sleep(0.05)
    for w in workers:
        w.join(30)
    assert [(r.status_code, r.headers["retry-after"], set(r.json())) for r in answers] == [(503, "1", {"error"})] * 2
    assert sorted(r.json()["error"].rsplit("while ", 1)[1] for r in answers) == [
        "parsing the request body", "waiting to parse: every decode slot is busy; the server is overloaded"]
    assert len(calls) == 1


def test_the_parse_stops_between_images_when_told():
    """The real parse calls ``check`` before every image: a check that raises (deadline, client gone) stops it."""
    seen: list[int] = []

    def check() -> None:
        seen.append(1)
        if len(seen) > 3:
            raise oip.InvalidInput("stop")

    body = json.dumps({"inputs": [bytes_input(b"a", b"b", b"c", b"d", b"e")]}).encode()
    with pytest.raises(oip.InvalidInput, match="stop"):
        oip.parse_request(body, len(body), (3, 224, 224), check)
    assert len(seen) == 4  # before the header, after it, then before images 0 and 1


# ---- the body deadline's 408 ------------------------------------------------------------------------------------


async def _read_body(scope: dict, receive: Any, send: Any) -> None:
    """An app that reads the whole body first (as v2 infer does), then answers."""
    await Request(scope, receive).body()
    await JSONResponse({})(scope, receive, send)


def stalled_request(path: str) -> list[dict]:
    """What the middleware sends for a POST to ``path`` whose body never finishes, with a 0.3 s body deadline."""
    app = BodyDeadlineMiddleware(_read_body, timeout_s=0.3)
    sent: list[dict] = []

    async def main() -> None:
        chunks = [b'{"inputs": [']

        async def receive() -> dict:
            if chunks:
                return {"type": "http.request", "body": chunks.pop(), "more_body": True}
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(main())
    return sent


@pytest.mark.parametrize(("path", "body"), [
    (INFER, {"error": "the request body did not arrive within 0.3 s"}),
    ("/tasks", {"error": "body_timeout", "detail": "the request body did not arrive within 0.3 s"}),
])
def test_the_body_deadline_answers_408_in_the_paths_error_shape(path, body):
    sent = stalled_request(path)
    assert (sent[0]["status"], json.loads(sent[1]["body"])) == (408, body)


def test_one_error_shape_by_path():
    assert error_body("/v2/models/x/infer", "timeout", "late") == {"error": "late"}
    assert error_body("/v2", "timeout", "late") == {"error": "late"}
    assert error_body("/v2x", "timeout", "late") == {"error": "timeout", "detail": "late"}
    assert error_body("/classify", "timeout", "late") == {"error": "timeout", "detail": "late"}


def test_v2_infer_is_counted_per_task(client, cat):
    def count(task: str, code: str) -> float:
        families = text_string_to_metric_families(client.get("/metrics").text)
        return sum(s.value for f in families if f.name == "repserve_requests" for s in f.samples
                   if s.name == "repserve_requests_total" and s.labels == {"task": task, "code": code})

    before = count("fashion", "200"), count("unknown", "404")
    assert client.post("/v2/models/fashion/versions/1/infer", json={"inputs": [bytes_input(cat)]}).status_code == 200
    assert client.post("/v2/models/nope/infer", json={"inputs": [bytes_input(cat)]}).status_code == 404
    assert (count("fashion", "200"), count("unknown", "404")) == (before[0] + 1, before[1] + 1)


# ---- auth and readiness ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Iterator[TestClient]:
    yield from start(tmp_path_factory.mktemp("v2-secured"), classify_token=READER)


def test_models_need_the_classify_token(secured, cat):
    request = {"inputs": [bytes_input(cat)], "outputs": [{"name": "labels"}], "parameters": {"top_k": 1}}
    r = secured.post(INFER, json=request)
    assert (r.status_code, r.headers["www-authenticate"], r.json()) == (
        401, "Bearer", {"error": "classification routes need 'Authorization: Bearer <token>'"})
    r = secured.get("/v2/models/imagenet", headers={"Authorization": "Bearer wrong-token-of-some-length"})
    assert (r.status_code, r.json()) == (403, {"error": "the bearer token is not valid for classification routes"})
    ok = {"Authorization": f"Bearer {READER}"}
    assert secured.post(INFER, json=request, headers=ok).json()["outputs"][0]["data"] == ["Egyptian cat"]
    assert secured.get("/v2/models/imagenet/ready", headers=ok).status_code == 200
    for path in ("/v2", "/v2/health/live", "/v2/health/ready"):  # open, as /healthz and /readyz
        assert secured.get(path).status_code == 200, path


def test_not_ready_is_503_with_the_protocols_body(tmp_path):
    client = TestClient(create_app(Settings(store=str(tmp_path))))  # no lifespan: the runtime never starts
    assert (client.get("/v2/health/live").status_code, client.get("/v2/health/live").content) == (200, b"")
    r = client.get("/v2/health/ready")
    assert (r.status_code, r.json()) == (503, {"error": "loading tasks and warming up"})
    r = client.get("/v2/models/imagenet")
    assert (r.status_code, r.headers["retry-after"], r.json()) == (503, "1", {"error": "the service is starting"})


def test_the_request_deadline_applies(tmp_path, cat):
    """The inference worker is held past ``request_timeout_s``: 503 with Retry-After, as /classify answers."""
    for client in start(tmp_path, request_timeout_s=0.5):
        request = {"inputs": [bytes_input(cat)], "outputs": [{"name": "labels"}]}
        assert client.post(INFER, json=request).status_code == 200  # loaded: only the worker can hold it up
        busy = threading.Thread(target=client.app.state.runtime.engine.call, args=(lambda: time.sleep(1.5),))
        busy.start()
        time.sleep(0.1)
        try:
            r = client.post(INFER, json=request)
        finally:
            busy.join(10)
        assert (r.status_code, r.headers["retry-after"], set(r.json())) == (503, "1", {"error"})
        assert r.json()["error"].startswith("no answer within "), r.json()
        assert client.post(INFER, json=request).status_code == 200
