"""NVIDIA's own client (``tritonclient.http``, binary tensor data by default) against a real server process on
loopback: health, model metadata and inference with a real photo file as BYTES and as an FP32 tensor, whose
answers equal /classify's. The server (embedded MobileNetV2, its ImageNet classifier as the ``imagenet`` task) is
stopped whatever happens; every client call has a timeout."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage.data
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bench.servers import ServerProcess
from repadapter.preprocess import PreprocessConfig, preprocess_batch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CHELSEA = Path(skimage.data.__file__).parent / "chelsea.png"  # a cat: the photo file scikit-image ships
TIMEOUT_S = 60.0
TOL = 1e-5
FLAGS = ("--store-poll-s", "0", "--torch-threads", "1", "--max-delay-ms", "1", "--log-level", "warning")


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory) -> ServerProcess:
    store = tmp_path_factory.mktemp("v2-client") / "store"
    shutil.copytree(REPO / "adapters_store", store)
    return start_server(store, *FLAGS)  # stopped by the fixture, also when a test fails


@pytest.fixture(scope="module")
def client(server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=TIMEOUT_S,
                                          network_timeout=TIMEOUT_S)
    yield client
    client.close()


@pytest.fixture(scope="module")
def classified(server) -> dict[str, float]:
    """/classify's answer for the photo: every class's probability, by label."""
    r = httpx.post(f"{server.url}/classify", params={"task": "imagenet", "top_k": 1000}, content=CHELSEA.read_bytes(),
                   headers={"content-type": "image/png"}, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    return {p["label"]: p["score"] for p in r.json()["results"][0]["predictions"]}


@pytest.fixture(scope="module")
def task(server) -> dict:
    return httpx.get(f"{server.url}/tasks/imagenet", timeout=TIMEOUT_S).json()


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("imagenet")
    assert client.is_model_ready("imagenet", "1")
    assert not client.is_model_ready("no-such-task")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata("imagenet")
    assert (meta["name"], meta["versions"]) == ("imagenet", ["1"])
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("FP32", [-1, 3, 224, 224]), "image_bytes": ("BYTES", [-1])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, 1000]), "labels": ("BYTES", [-1, -1])}


def infer(client: triton.InferenceServerClient, tensor: triton.InferInput, *, binary: bool) -> triton.InferResult:
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "labels")]
    return client.infer("imagenet", [tensor], outputs=outputs, parameters={"top_k": 3}, timeout=int(TIMEOUT_S))


def assert_as_classify(result: triton.InferResult, labels: list[str], classified: dict[str, float]) -> None:
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 1000)
    assert max(abs(float(p) - classified[label]) for label, p in zip(labels, probabilities[0], strict=True)) <= TOL
    top = sorted(classified, key=classified.__getitem__, reverse=True)[:3]
    # tritonclient gives BYTES as bytes from binary data, as str from JSON
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("labels")[0]] == top
    assert top[0] == "Egyptian cat"


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_input_of_a_photo_file(client, task, classified, binary):
    tensor = triton.InferInput("image_bytes", [1], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array([CHELSEA.read_bytes()], dtype=np.object_))
    else:  # JSON: BYTES elements are strings, so the file goes base64
        tensor.set_data_from_numpy(np.array([base64.b64encode(CHELSEA.read_bytes())], dtype=np.object_),
                                   binary_data=False)
    assert_as_classify(infer(client, tensor, binary=binary), task["labels"], classified)


def test_fp32_tensor_input(client, task, classified):
    x = preprocess_batch([CHELSEA.read_bytes()], PreprocessConfig.model_validate(task["preprocess"])).numpy()
    tensor = triton.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("imagenet", [tensor], model_version="1", parameters={"top_k": 3}, timeout=int(TIMEOUT_S))
    assert_as_classify(result, task["labels"], classified)


def test_errors_reach_the_client_as_the_protocol_says(client):
    tensor = triton.InferInput("image", [1, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(InferenceServerException) as bad:
        client.infer("imagenet", [tensor], timeout=int(TIMEOUT_S))
    assert (bad.value.status(), bad.value.message()) == (
        "400", "input 'image': shape [1, 3, 32, 32]; this task takes [N, 3, 224, 224]")
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("no-such-task")
    assert unknown.value.status() == "404"


def test_an_oversized_json_tensor_is_413_with_the_protocols_body(server):
    """A JSON tensor of more numbers than the server's most images (64) hold, two bytes a number: refused on
    the body's bytes, before parsing, with the protocol's error body (tritonclient reads ``error``)."""
    images, pixels = 65, 3 * 224 * 224
    head = b'{"inputs": [{"name": "image", "shape": [65, 3, 224, 224], "datatype": "FP32", "data": ['
    r = httpx.post(f"{server.url}/v2/models/imagenet/infer", content=head + b"0," * (images * pixels - 1) + b"0]}]}",
                   headers={"content-type": "application/json"}, timeout=TIMEOUT_S)
    values = 64 * (pixels + 3 * 224 + 3 + 1) + 4096
    assert (r.status_code, r.json()) == (413, {"error": f"the request holds more than {values} JSON values, more "
                                                        "than this task's most images can"})
