"""The OpenAPI schema describes the server as configured (security per token, multipart bodies, error bodies),
and a method a path does not take gets 405 naming every method it does. No runtime is started: neither needs
one. tests/integration/test_fuzz.py holds a live server to the same schema."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

ADMIN, READER = "admin-token-for-tests", "reader-token-for-tests"
ADMIN_OPS = {("post", "/tasks"), ("delete", "/tasks/{name}")}
READER_OPS = {("post", "/classify"), ("get", "/tasks"), ("get", "/tasks/{name}"),
              *{(method, f"/v2/models/{{name}}{version}{op}") for version in ("", "/versions/{version}")
                for method, op in (("get", ""), ("get", "/ready"), ("post", "/infer"))}}


def schema(tmp_path, **tokens: str) -> dict:
    return TestClient(create_app(Settings(store=str(tmp_path), **tokens))).get("/openapi.json").json()


def operations(spec: dict) -> dict[tuple[str, str], dict]:
    return {(method, path): op for path, ops in spec["paths"].items() for method, op in ops.items()}


def test_open_server_declares_no_security(tmp_path):
    spec = schema(tmp_path)
    assert "securitySchemes" not in spec["components"]
    for key, op in operations(spec).items():
        assert "security" not in op, key
        assert not {"401", "403"} & set(op["responses"]), key


@pytest.mark.parametrize(("tokens", "admin", "reader"), [
    ({"admin_token": ADMIN}, [{"adminToken": []}], None),
    ({"classify_token": READER}, None, [{"classifyToken": []}]),
    ({"admin_token": ADMIN, "classify_token": READER}, [{"adminToken": []}],
     [{"classifyToken": []}, {"adminToken": []}]),
])
def test_each_role_declares_its_token_only_when_set(tmp_path, tokens, admin, reader):
    spec = schema(tmp_path, **tokens)
    assert set(spec["components"]["securitySchemes"]) == {n for r in (admin or []) + (reader or []) for n in r}
    for key, op in operations(spec).items():
        expected = admin if key in ADMIN_OPS else reader if key in READER_OPS else None
        assert op.get("security") == expected, key
        assert ({"401", "403"} <= set(op["responses"])) == (expected is not None), key
        if expected:
            assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True


def test_multipart_bodies_say_what_the_server_takes(tmp_path):
    ops = operations(TestClient(create_app(Settings(store=str(tmp_path), max_images_per_request=7)))
                     .get("/openapi.json").json())
    images = ops["post", "/classify"]["requestBody"]["content"]["multipart/form-data"]
    assert images["schema"]["additionalProperties"] is False
    assert (images["schema"]["properties"]["files"]["minItems"], images["schema"]["properties"]["files"]["maxItems"]) \
        == (1, 7)
    bundle = ops["post", "/tasks"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert bundle["additionalProperties"] is False
    assert [branch["required"] for branch in bundle["oneOf"]] == [["manifest", "tensors"], ["bundle"]]


def test_every_error_body_is_error_body(tmp_path):
    spec = schema(tmp_path, admin_token=ADMIN)
    assert "HTTPValidationError" not in json.dumps(spec)
    assert operations(spec)["get", "/tasks/{name}"]["responses"]["422"]["content"]["application/json"]["schema"] \
        == {"$ref": "#/components/schemas/ErrorBody"}


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("OPTIONS", "/tasks", "GET, POST"),
    ("PUT", "/tasks/x", "DELETE, GET"),
    ("OPTIONS", "/tasks/x", "DELETE, GET"),
    ("GET", "/classify", "POST"),
    ("PROPFIND", "/healthz", "GET"),
])
def test_405_names_every_method_of_the_path(tmp_path, method, path, allow):
    r = TestClient(create_app(Settings(store=str(tmp_path), admin_token=ADMIN))).request(method, path)
    assert (r.status_code, r.headers["allow"]) == (405, allow)
    assert r.json()["error"] == "method_not_allowed"
