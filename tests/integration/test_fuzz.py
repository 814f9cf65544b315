"""API fuzzing: schemathesis drives every operation of a live server's own OpenAPI schema.

Real ``python -m service`` processes on loopback (embedded backbone at 32 px, three small tasks), one per
configuration, each over a store of its own: open (no tokens, so the schema declares no security) and
secured (admin and classify tokens: schemathesis sends the token each operation declares, and also tries
none and a wrong one, expecting 401/403). Every response is checked (schemathesis's default checks): no
5xx, a declared status code, content type and headers, a body matching its schema, schema-invalid requests
refused and schema-valid ones accepted, 405 with a true ``Allow`` for undeclared methods, auth enforced
where declared; plus the checks below.

Valid content where JSON Schema cannot say what valid is: image parts are real small PNGs, bundle
archives real task bundles (``media_types``), and ``task``/``name`` are known task names half the time,
so the fuzzer reaches classification, registration and deletion, not only 404s. POST and DELETE /tasks
change the store: only this module's servers and stores see it, and every upload is bounded.

Reproducible (fixed seed, derandomized, no example database) and bounded: ``MAX_EXAMPLES`` per operation
and phase (examples, coverage, fuzzing), then ``STATEFUL_SCENARIOS`` linked sequences.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.core.media_types import MEDIA_TYPE_STRATEGIES

from bench.servers import ServerProcess
from repadapter import LocalStore, TaskBundle
from service.openapi import ADMIN_SCHEME, CLASSIFY_SCHEME
from tests.servicekit import Model, archive, bundle_parts

pytestmark = pytest.mark.slow

SIZE = 32  # px: the embedded MobileNetV2 at a CPU-friendly input size
SERVED = {"t0": 1, "t1": 2, "t2": 3}
UPLOADED = {"fz-a": 4, "fz-b": 5}  # what the fuzzer registers (zip archives)
TASK_NAMES = [*SERVED, *UPLOADED, "imagenet"]  # imagenet: the builtin (GET shows it; DELETE is 409)
ADMIN_TOKEN = "fuzz-admin-0123456789abcdef"
CLASSIFY_TOKEN = "fuzz-classify-0123456789abcdef"
CONFIGURATIONS = {"open": (), "secured": ("--admin-token", ADMIN_TOKEN, "--classify-token", CLASSIFY_TOKEN)}
SEED = 20_260_412
MAX_EXAMPLES = 25
STATEFUL_SCENARIOS, STATEFUL_STEPS = 15, 6
# Small server limits: crossing them is cheap (413), and what the server reads is bounded whatever is sent.
MAX_IMAGES, MAX_IMAGE_BYTES, MAX_BUNDLE_BYTES = 4, 64 << 10, 1 << 20
MAX_UPLOAD_BYTES = 2 << 20  # what the fuzzer may send in one request (bounded_upload)
FLAGS = ("--store-poll-s", "0", "--torch-threads", "1", "--no-warmup", "--max-delay-ms", "1",
         "--log-level", "warning", "--max-images-per-request", str(MAX_IMAGES),
         "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-bundle-bytes", str(MAX_BUNDLE_BYTES))
# schemathesis's default for a schema-valid request, plus 422 for POST /tasks: its `manifest` and `tensors`
# are declared binary and drawn at random (a real pair would need one strategy for both parts), so a valid
# request may carry an invalid bundle. Its structure is still checked: see well_formed_is_not_malformed.
ACCEPTED = ["2XX", "3XX", "401", "403", "404", "409", "429", "5XX"]

Check = Callable[[schemathesis.CheckContext, schemathesis.Response, schemathesis.Case], None]


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load("embedded")


@pytest.fixture(scope="module")
def served(model) -> dict[str, TaskBundle]:
    return {name: model.bundle(name, seed, size=SIZE, std=0.02) for name, seed in SERVED.items()}


@pytest.fixture(scope="module")
def served_archives(served) -> dict[str, bytes]:
    return {name: archive(bundle_parts(bundle)) for name, bundle in served.items()}


@pytest.fixture(scope="module")
def media_types(model) -> Iterator[None]:
    """Real content for what JSON Schema calls binary: PNG images, zip task bundles (head-only: 26 KB)."""
    archives = [archive(bundle_parts(model.bundle(name, seed, size=SIZE, adapters=False)))
                for name, seed in UPLOADED.items()]
    before = dict(MEDIA_TYPE_STRATEGIES)
    schemathesis.openapi.media_type("image/png", pngs())
    schemathesis.openapi.media_type("application/zip", st.sampled_from(archives))
    yield
    MEDIA_TYPE_STRATEGIES.clear()
    MEDIA_TYPE_STRATEGIES.update(before)


def pngs() -> st.SearchStrategy[bytes]:
    def encode(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, "PNG")
        return buf.getvalue()

    side, channel = st.integers(1, 48), st.integers(0, 255)
    return st.builds(encode, st.tuples(side, side), st.tuples(channel, channel, channel))


@pytest.fixture(scope="module", params=list(CONFIGURATIONS))
def configuration(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory, served, configuration) -> Iterator[ServerProcess]:
    """A server of its own over a store of its own, stopped before the next configuration's starts."""
    store = LocalStore(tmp_path_factory.mktemp(f"fuzz-{configuration}") / "store")
    for bundle in served.values():
        store.put(bundle)
    proc = start_server(store.root, *FLAGS, *CONFIGURATIONS[configuration])
    yield proc
    proc.stop()


def fuzz_config(secured: bool) -> schemathesis.Config:
    data: dict = {
        "seed": SEED,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "request-timeout": 30,
        "dictionaries": {"tasks": {"values": TASK_NAMES}, "versions": {"values": ["0", "1"]}},
        "parameters": {"query.task": {"dictionary": "tasks", "probability": 0.5},
                       "path.name": {"dictionary": "tasks", "probability": 0.5},
                       "path.version": {"dictionary": "versions", "probability": 0.5}},
        "operations": [{"include-name": "POST /tasks",
                        "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "422"]}}},
                       # v2 infer: JSON Schema cannot say that `data` holds as many values as `shape` says, nor that
                       # BYTES are images, so a valid request may carry invalid input (400) or too many images (413)
                       *({"include-name": f"POST /v2/models/{{name}}{version}/infer",
                          "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "400", "413"]}}}
                         for version in ("", "/versions/{version}"))],
    }
    if secured:
        data["auth"] = {"openapi": {ADMIN_SCHEME: {"bearer": ADMIN_TOKEN}, CLASSIFY_SCHEME: {"bearer": CLASSIFY_TOKEN}}}
    return schemathesis.Config.from_dict(data)


@pytest.fixture(scope="module")
def api(server, configuration, media_types) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=fuzz_config(configuration == "secured"))


@pytest.fixture(scope="module")
def answered(configuration) -> Counter[tuple[str, int]]:
    """(operation, status) of every response the fuzzer got, in this configuration."""
    return Counter()


def bounded_upload(_ctx: schemathesis.CheckContext, response: schemathesis.Response, _case: schemathesis.Case) -> None:
    """Generated uploads stay small (the server's limits refuse larger ones anyway)."""
    size = len(response.request.body or b"")
    assert size <= MAX_UPLOAD_BYTES, f"a {size}-byte request body; the fuzzer must stay under {MAX_UPLOAD_BYTES}"


def well_formed_is_not_malformed(_ctx: schemathesis.CheckContext, response: schemathesis.Response,
                                 case: schemathesis.Case) -> None:
    """A request the schema allows is never refused as ``malformed_request``: the structure the schema describes
    (fields, how many files, which combination) is the structure the server takes."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 422:
        return
    body = response.json()
    assert body.get("error") != "malformed_request", f"a schema-valid request refused as malformed: {body}"


@pytest.fixture(scope="module")
def checks(answered) -> list[Check]:
    def count(_ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
        answered[case.operation.label, response.status_code] += 1

    return [bounded_upload, well_formed_is_not_malformed, count]


def files_as_list(case: schemathesis.Case) -> None:
    """schemathesis 4.32 sends a media-type strategy's value for an *array* of files (``files``) as one bare
    part without a filename, which servers read as a text field (RFC 7578: a file SHOULD have one). Sent as
    the one-element array the schema describes, it is a file. Positive cases only: a negative one stays as drawn."""
    if (case.meta is not None and case.meta.generation.mode.is_positive and isinstance(case.body, dict)
            and isinstance(case.body.get("files"), bytes)):
        case.body["files"] = [case.body["files"]]


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request) -> None:
    """schemathesis 4.32's lazy schemas read ``node._nodeid``, which pytest 9.2 no longer has (``nodeid`` is)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
def test_every_operation_conforms_to_the_schema(case, checks):
    files_as_list(case)
    case.call_and_validate(additional_checks=checks)


def test_linked_sequences_conform_to_the_schema(api, server, configuration, served_archives, checks):
    """Sequences along the links schemathesis infers (POST /tasks -> GET and DELETE /tasks/{name}, ...).

    Hypothesis replays a scenario from its draws, so the server must answer alike: every scenario starts from
    the same tasks (the fuzzer's uploads deleted, served tasks it deleted registered again)."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if configuration == "secured" else {}

    class Scenario(api.as_state_machine()):
        def setup(self) -> None:
            with httpx.Client(base_url=server.url, headers=admin, timeout=30) as client:
                for name in UPLOADED:
                    assert client.delete(f"/tasks/{name}").status_code in (204, 404)
                for name, blob in served_archives.items():
                    if client.get(f"/tasks/{name}").status_code == 404:
                        r = client.post("/tasks", files={"bundle": (f"{name}.zip", blob, "application/zip")})
                        assert r.status_code == 201, r.text

        def before_call(self, case: schemathesis.Case) -> None:
            files_as_list(case)

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            super().validate_response(response, case, [*(additional_checks or ()), *checks], **kwargs)

    Scenario.run(settings=hypothesis.settings(
        max_examples=STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS, derandomize=True, database=None,
        deadline=None, phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck)))


def test_the_fuzzer_reached_every_operation(api, answered):
    """Every operation answered at least once with success, so the checks above saw real answers (a fuzzer
    stuck on 404s or 401s would pass them all)."""
    if not answered:
        pytest.skip("counts the responses of the tests above: run it with them")
    succeeded = {label for (label, status), _ in answered.items() if 200 <= status < 300}
    operations = {op.ok().label for op in api.get_all_operations()}
    assert operations - succeeded == set(), sorted(answered.items())
    print(f"{sum(answered.values())} responses:", sorted(answered.items()))
