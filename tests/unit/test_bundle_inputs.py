"""Bundle inputs a replica must refuse, each through POST /tasks: its exact status and error code, a message
naming the problem, and nothing changed afterwards (store files, GET /tasks, the residency's tiers).

Cases tested elsewhere and not repeated here: checksum, other backbone, head vs labels, NaN, unknown site,
adapter shape, refused input size, malformed JSON (``test_service_api.py::test_invalid_bundles_change_nothing``);
archive layouts and bombs (``test_service_archive.py``); path tricks on the store (``test_store.py``).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from repadapter import AdapterWeights, PreprocessConfig, RepAdapter, TaskBundle, WeightSwitcher, attach_slots
from repadapter.errors import BundleError
from service.app import create_app
from service.settings import Settings
from service.validation import probe_input
from tests.conftest import image_batch, random_adapters
from tests.servicekit import (
    TINY_ARCH,
    TINY_OPTIONS,
    answers,
    archive,
    assert_predictions,
    multipart_bundle,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_BUNDLE = 300_000  # bytes; the tiny ViT's bundles are ~65 kB
Parts = tuple[dict, dict[str, torch.Tensor]]


def start(store: Path, **kw: object) -> Iterator[TestClient]:
    settings = Settings(backbone=TINY_ARCH, backbone_options=TINY_OPTIONS, store=store, store_poll_s=0,
                        max_bundle_bytes=MAX_BUNDLE, **kw)
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "readiness")
        yield client


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    yield from start(tmp_path_factory.mktemp("inputs") / "store")


@pytest.fixture(scope="module")
def half(tmp_path_factory) -> Iterator[TestClient]:
    """Serving in float16, where a head that is finite in float32 can overflow."""
    yield from start(tmp_path_factory.mktemp("half") / "store", dtype="float16")


def state(client: TestClient) -> tuple:
    """What a refused registration must leave as it was: the task list, every file of the store, the tiers."""
    runtime = client.app.state.runtime
    files = sorted(str(p.relative_to(runtime.store.root)) for p in runtime.store.root.rglob("*"))
    tiers = [sorted(tier.keys()) for tier in (runtime.residency.host, runtime.residency.on_device,
                                               runtime.residency.merged)]
    return client.get("/tasks").json(), files, tiers


def error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert (set(body), body["error"]) == ({"error", "detail"}, code), body
    return body["detail"]


def parts(model, name: str = "bad", seed: int = 41) -> Parts:
    """A valid bundle as an editable manifest document and tensors (no checksum: it is optional on upload)."""
    bundle = model.bundle(name, seed)
    manifest = json.loads(bundle.manifest.model_dump_json())
    manifest["tensors_sha256"] = ""
    return manifest, bundle.tensors()


def upload(manifest: dict, tensors: dict[str, torch.Tensor] | bytes) -> list:
    data = tensors if isinstance(tensors, bytes) else st_save({k: t.contiguous() for k, t in tensors.items()})
    return [("manifest", ("manifest.json", json.dumps(manifest).encode(), "application/json")),
            ("tensors", ("adapter.safetensors", data, "application/octet-stream"))]


def pickled(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)  # a pickle, as a .pt checkpoint is
    return buf.getvalue()


SITE = "blocks.0.adapter_attn"


def _set(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Parts], None]:
    return lambda p: p[1].__setitem__(key, fn(p[1].get(key, torch.zeros(1))))


def _poke(key: str, value: float) -> Callable[[Parts], None]:
    def edit(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return _set(key, edit)


def _manifest(path: str, value: object) -> Callable[[Parts], None]:
    def edit(p: Parts) -> None:
        *head, last = path.split(".")
        doc = p[0]
        for k in head:
            doc = doc[k]
        doc[last] = value
    return edit


def _drop(*keys: str) -> Callable[[Parts], None]:
    return lambda p: [p[1].pop(k) for k in keys]


REFUSED = {  # what: (edit, status, code, the message names)
    # preprocessing (refused when the manifest is parsed; the probe's own guard is tested below)
    "std_zero": (_manifest("preprocess.std", [0.0, 0.0, 0.0]), 422, "invalid_bundle", "std"),
    "mean_nan": (_manifest("preprocess.mean", [math.nan, 0.5, 0.5]), 422, "invalid_bundle", "mean"),
    "interpolation": (_manifest("preprocess.interpolation", "bogus"), 422, "invalid_bundle", "interpolation"),
    "crop_mode": (_manifest("preprocess.crop_mode", "bogus"), 422, "invalid_bundle", "crop_mode"),
    # the manifest's adapter config vs the tensors
    "hidden_zero_with_adapters": (_manifest("adapter.hidden", 0), 422, "invalid_bundle", "adapter.hidden is 0"),
    "hidden_mismatch": (_manifest("adapter.hidden", 4), 422, "invalid_bundle", "adapter.hidden is 4"),
    "hidden_vs_groups": (_manifest("adapter.groups", 3), 422, "invalid_bundle", "divisible by groups=3"),
    "scale_huge": (_manifest("adapter.scale", 1e30), 422, "invalid_bundle", "adapter.scale"),
    "outside_placement": (_manifest("adapter.placement", "attn"), 422, "invalid_bundle",
                          "outside placement 'attn'"),
    # keys
    "missing_site": (_drop(*(f"adapter.blocks.1.adapter_mlp.{k}" for k in ("weight_a", "bias_a", "weight_b",
                                                                          "bias_b"))),
                     422, "invalid_bundle", "no adapters for 1 of the 6 sites of placement 'block': "
                                            "['blocks.1.adapter_mlp']"),
    "missing_param": (_drop(f"adapter.{SITE}.bias_a"), 422, "invalid_bundle", "lacks ['bias_a']"),
    "missing_head": (_drop("head.weight"), 422, "invalid_bundle", "missing tensor 'head.weight'"),
    "extra_param": (_set(f"adapter.{SITE}.gate", lambda t: t), 422, "invalid_bundle",
                    f"unexpected tensor 'adapter.{SITE}.gate'"),
    "extra_key": (_set("optimizer.step", lambda t: t), 422, "invalid_bundle",
                  "unexpected tensor 'optimizer.step'"),
    # dtypes and shapes
    "float16": (_set(f"adapter.{SITE}.weight_a", lambda t: t.half()), 422, "invalid_bundle",
                f"'adapter.{SITE}.weight_a' is float16; bundle tensors are float32"),
    "int64": (_set("head.bias", lambda t: t.long()), 422, "invalid_bundle", "'head.bias' is int64"),
    "bias_b_shape": (_set(f"adapter.{SITE}.bias_b", lambda t: t[:-1]), 422, "invalid_bundle",
                     "bias_b has shape (191,), expected (192,)"),
    "head_features": (_set("head.weight", lambda t: t[:, :-1]), 422, "invalid_bundle",
                      "head takes 191 features, the backbone gives 192"),
    # values
    "inf": (_poke(f"adapter.{SITE}.bias_b", math.inf), 422, "invalid_bundle", "not finite"),
    "head_3e38": (_poke("head.weight", 3e38), 422, "invalid_bundle", "'head.weight' has values up to 3e+38"),
    "adapter_1e18": (_poke(f"adapter.{SITE}.weight_a", 1e18), 422, "invalid_bundle",
                     f"'adapter.{SITE}.weight_a' has values up to 1e+18; bundle values are bounded by 1e+06"),
    # names that are paths
    "name_parent": (_manifest("name", "../evil"), 422, "invalid_bundle", "invalid manifest: name"),
    "name_slash": (_manifest("name", "a/b"), 422, "invalid_bundle", "invalid manifest: name"),
    "name_absolute": (_manifest("name", "/etc/passwd"), 422, "invalid_bundle", "invalid manifest: name"),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_bad_bundle_is_refused_and_changes_nothing(client, model, what):
    edit, status, code, says = REFUSED[what]
    p = parts(model)
    edit(p)
    before = state(client)
    detail = error(client.post("/tasks", files=upload(*p)), status, code)
    assert says in detail, detail
    assert state(client) == before


@pytest.mark.parametrize("how", ["multipart", "zip"])
def test_pickle_is_never_read(client, model, how):
    """A .pt (pickle) sent as the tensors is refused as what it is; nothing in it is unpickled."""
    manifest, tensors = parts(model)
    blob = pickled(tensors)
    before = state(client)
    if how == "multipart":
        files = upload(manifest, blob)
    else:
        files = [("bundle", ("b.zip", archive({"manifest.json": json.dumps(manifest).encode(),
                                                "adapter.safetensors": blob}), "application/zip"))]
    assert "not a safetensors file" in error(client.post("/tasks", files=files), 422, "invalid_bundle")
    assert state(client) == before


def test_oversize_bundle_is_413(client, model):
    manifest, _ = parts(model)
    before = state(client)
    detail = error(client.post("/tasks", files=upload(manifest, b"\x00" * (MAX_BUNDLE + 1))), 413,
                   "payload_too_large")
    assert f"the limit is {MAX_BUNDLE}" in detail
    assert state(client) == before


def test_probe_forward_refuses_a_head_that_overflows_the_serving_dtype(half, model, images):
    """|head| = 6e4 is finite in float16 (max 65504) and within the bundle bound, but its logits are not:
    only running the task shows it. The same task with a normal head registers and answers."""
    manifest, tensors = parts(model, "hot")
    tensors["head.weight"] = torch.randn(tensors["head.weight"].shape, generator=torch.Generator().manual_seed(0))
    tensors["head.weight"] = tensors["head.weight"].sign() * 6e4
    before = state(half)
    detail = error(half.post("/tasks", files=upload(manifest, tensors)), 422, "invalid_bundle")
    assert "probe forward on a fixed image gives non-finite logits in torch.float16" in detail
    assert "head" in detail
    assert state(half) == before
    r = half.post("/tasks", files=multipart_bundle(model.bundle("hot", 41)))
    assert r.status_code == 201, r.text
    got = half.post("/classify?task=hot", files=[("files", ("a.jpg", images[0], "image/jpeg"))]).json()
    assert all(math.isfinite(p["score"]) for res in got["results"] for p in res["predictions"])


def test_valid_bundles_still_register_and_serve_exactly(client, model, images):
    """The checks refuse nothing valid: a task with adapters and a linear probe (no adapter tensors)."""
    for bundle in (model.bundle("good", 42), model.bundle("linear", 43, adapters=False)):
        r = client.post("/tasks", files=multipart_bundle(bundle))
        assert r.status_code == 201, r.text
        got = client.post(f"/classify?task={bundle.name}", files=[("files", ("a.jpg", images[0], "image/jpeg"))])
        assert_predictions(answers(got.json()), model.predict(bundle, images[:1]))


# ---- the core's own checks, below the route -------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "says"), [
    ("std", (0.0, 0.0, 0.0), "std=[0.0, 0.0, 0.0]"),
    ("mean", (math.nan, 0.5, 0.5), "non-finite values (check preprocess.mean and preprocess.std)"),
    ("interpolation", "bogus", "interpolation='bogus'"),
])
def test_probe_input_refuses_preprocessing_that_cannot_run(model, field, value, says):
    """The probe's own guard, for a config that got past parsing (built unvalidated here)."""
    bundle = model.bundle("pre", 1)
    cfg = PreprocessConfig.model_construct(**{**dict(bundle.manifest.preprocess), field: value})
    with pytest.raises(BundleError, match="preprocessing") as e:
        probe_input(bundle.manifest.model_copy(update={"preprocess": cfg}))
    assert says in str(e.value)


def test_probe_input_is_fixed(model):
    m = model.bundle("pre", 1).manifest
    x = probe_input(m)
    assert x.shape == (1, *m.preprocess.input_size)
    assert torch.equal(x, probe_input(m))


def test_adapter_scale_or_groups_unlike_the_manifests_are_refused(model):
    """The file stores the scale once (the manifest's): adapters built with another one are refused instead of
    being served, silently, at the manifest's value."""
    good = model.bundle("scaled", 1)
    other = {k: AdapterWeights(*w.tensors().values(), w.groups, 2.0) for k, w in good.adapters.items()}
    with pytest.raises(BundleError, match=r"scale=2.0, groups=2; the manifest's adapter config says scale=1.0"):
        TaskBundle(good.manifest, other, good.head_weight, good.head_bias)
    regrouped = {k: AdapterWeights(*w.tensors().values(), 1, w.scale) for k, w in good.adapters.items()}
    with pytest.raises(BundleError, match="groups=1"):
        TaskBundle(good.manifest, regrouped, good.head_weight, good.head_bias)


def test_float64_model_folds_in_float64(tiny_vit, photos):
    """A float64 model merges at float64 accuracy (a float32 fold left 2e-8..2e-7)."""
    bb = tiny_vit()
    bb.model.double()
    sites = attach_slots(bb.model)
    adapters = {k: w.to(dtype=torch.float64) for k, w in random_adapters(sites, seed=3).items()}
    x = image_batch(photos[:2], bb).double()
    with torch.no_grad():
        for s in sites:
            s.slot.adapter = RepAdapter.from_weights(adapters[s.name], s.layout).eval()
        unmerged = bb.model(x)
        for s in sites:
            s.slot.adapter = None
        sw = WeightSwitcher(sites)
        sw.activate(sw.prepare("t", random_adapters(sites, seed=3)))  # float32 adapters, as bundles hold them
        merged = bb.model(x)
    assert merged.dtype == torch.float64
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()).item() <= 1e-12
