"""GET /openapi.json kept true: every route of app.router is in it with the same methods and nothing else is, the
document is valid OpenAPI 3.1, real answers of a live server validate against it, and schemathesis' generated
requests against `python -m server` get no 5xx and only answers the document describes."""
from __future__ import annotations

import asyncio
import io
import struct
from pathlib import Path

import aiohttp
import jsonschema
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate as validate_spec
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance,
                                               unsupported_method)

from runtime.cascade.engine import Engine
from server.app import create_app
from server.config import ServerConfig, package_version
from server.openapi import openapi_document
from fixtures.checkpoints import make_vit
from fixtures.images import b64, jpeg
from fixtures.serving import MAX_BATCH, ServerProcess, read_events, serving

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = openapi_document()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_vit")
    make_vit(path, seed=7)
    return path


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine.load(model_dir, device="cpu", dtype="float32", max_batch=MAX_BATCH)


def routed(app) -> set[tuple[str, str]]:
    """(path, METHOD) of every route; the HEAD that add_get registers beside each GET is GET's own."""
    pairs = {(route.resource.canonical, route.method) for route in app.router.routes()}
    return {(path, method) for path, method in pairs if not (method == "HEAD" and (path, "GET") in pairs)}


def test_every_route_is_described_and_nothing_else(engine, model_dir):
    app = create_app(engine, ServerConfig(model=model_dir, port=0))
    described = {(path, method.upper()) for path, operations in SPEC["paths"].items() for method in operations}
    assert routed(app) == described


def test_the_document_is_valid_openapi_31_with_the_package_version():
    validate_spec(SPEC)
    assert SPEC["openapi"].startswith("3.1") and SPEC["info"]["version"] == package_version()


def response_spec(path: str, method: str, status: int) -> dict:
    """The document's response for status on an operation; unrouted answers (404, 405) are in components."""
    if path in SPEC["components"]["responses"]:
        return SPEC["components"]["responses"][path]
    responses = SPEC["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, which the document does not list"
    return responses[str(status)]


def assert_matches(path: str, method: str, status: int, content_type: str, body: bytes, headers) -> object:
    """The answer validates against the document: status, media type, required headers and JSON schema. Returns
    the parsed JSON body (or the raw body)."""
    described = response_spec(path, method, status)
    media_type = content_type.split(";")[0]
    assert media_type in described["content"], (path, status, content_type)
    for name, header in described.get("headers", {}).items():
        assert not header.get("required") or name in headers, (path, status, name)
    if media_type != "application/json":
        return body
    payload = orjson.loads(body)
    schema = {**described["content"][media_type]["schema"], "components": SPEC["components"]}  # for its $refs
    jsonschema.Draft202012Validator(schema).validate(payload)
    return payload


def multipart(data: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("note", "ignored")
    form.add_field("image", io.BytesIO(data), filename="street.jpg", content_type="image/jpeg")
    return form


def test_real_answers_match_the_document(engine, model_dir):
    image = jpeg(1)
    infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(image)]}],
             "outputs": [{"name": "prediction"}, {"name": "label"}]}
    # (method, request path, the document's path, body or form, content type, expected status)
    cases = [
        ("POST", "/v1/predict?detail=1", "/v1/predict", image, "image/jpeg", 200),
        ("POST", "/v1/predict", "/v1/predict", orjson.dumps({"image": b64(image)}), "application/json", 200),
        ("POST", "/v1/predict", "/v1/predict", multipart(image), None, 200),
        ("POST", "/v1/predict", "/v1/predict", b"{not json", "application/json", 400),
        ("POST", "/v1/predict?detail=maybe", "/v1/predict", image, "image/jpeg", 400),
        ("POST", "/v1/predict?explain=1", "/v1/predict", image, "image/jpeg", 400),  # no vlm stage here
        ("POST", "/v1/predict", "/v1/predict", b"text", "text/plain", 415),
        ("POST", "/v1/predict", "/v1/predict", b"\xff\xd8\xff truncated", "image/jpeg", 422),
        ("POST", "/v1/predict/batch?detail=1", "/v1/predict/batch",
         orjson.dumps({"images": [b64(image), "not base64!", b64(b"not an image")]}), "application/json", 200),
        ("POST", "/ImageSynapse", "/ImageSynapse",
         orjson.dumps({"name": "ImageSynapse", "image": b64(image), "timeout": 12.0}), "application/json", 200),
        ("GET", "/healthz", "/healthz", None, None, 200),
        ("GET", "/readyz", "/readyz", None, None, 200),
        ("GET", "/v1/models", "/v1/models", None, None, 200),
        ("GET", "/metrics", "/metrics", None, None, 200),
        ("GET", "/openapi.json", "/openapi.json", None, None, 200),
        ("GET", "/v2", "/v2", None, None, 200),
        ("GET", "/v2/health/ready", "/v2/health/ready", None, None, 200),
        ("GET", "/v2/models/roadwork/versions/1", "/v2/models/{model}/versions/{version}", None, None, 200),
        ("GET", "/v2/models/roadwork/config", "/v2/models/{model}/config", None, None, 200),
        ("GET", "/v2/models/stats", "/v2/models/stats", None, None, 200),
        ("POST", "/v2/repository/index", "/v2/repository/index", None, None, 200),
        ("POST", "/v2/models/roadwork/infer", "/v2/models/{model}/infer", orjson.dumps(infer), "application/json",
         200),
        ("POST", "/v2/models/nope/infer", "/v2/models/{model}/infer", orjson.dumps(infer), "application/json", 404),
        ("POST", "/v2/models/roadwork/infer", "/v2/models/{model}/infer", b"[]", "application/json", 400),
        # Were 500s: a tensor's or an output's "parameters" that is no object.
        ("POST", "/v2/models/roadwork/infer", "/v2/models/{model}/infer",
         orjson.dumps({**infer, "inputs": [{**infer["inputs"][0], "parameters": [1]}]}), "application/json", 400),
        ("POST", "/v2/models/roadwork/infer", "/v2/models/{model}/infer",
         orjson.dumps({**infer, "outputs": [{"name": "label", "parameters": "binary"}]}), "application/json", 400),
        # Was a 200 stream: capture was read only after the stream opened, and only with --hardcases.
        ("POST", "/v1/predict/stream?capture=maybe", "/v1/predict/stream", image, "image/jpeg", 400),
        ("GET", "/v1/nope", "NotFound", None, None, 404),
        ("GET", "/v2/nope", "KServeNotFound", None, None, 404),
        ("GET", "/v1/predict", "MethodNotAllowed", None, None, 405),
        ("DELETE", "/v2/models/roadwork/infer", "KServeMethodNotAllowed", None, None, 405),
    ]

    async def scenario():
        async with serving(engine, model_dir) as s:
            answers = []
            for method, path, _, body, content_type, _ in cases:
                headers = {} if content_type is None else {"Content-Type": content_type}
                async with s.client.request(method, s.url + path, data=body, headers=headers) as r:
                    answers.append((r.status, r.headers.get("Content-Type", ""), await r.read(), r.headers))
            return answers

    answers = asyncio.run(scenario())
    for (method, path, described, _, _, want), (status, content_type, body, headers) in zip(cases, answers):
        assert status == want, (method, path, status, body[:300])
        assert_matches(described, method, status, content_type, body, headers)
    batch = orjson.loads(answers[8][2])["results"]
    assert "prediction" in batch[0] and batch[1]["error"]["code"] == "invalid_base64"
    assert answers[-2][3]["Allow"] == "POST"  # GET /v1/predict


def test_stream_events_match_the_document(engine, model_dir):
    """Each /v1/predict/stream event's data validates against the document's schema for that event."""
    data_schemas = {branch["properties"]["event"]["const"]: branch["properties"]["data"]["contentSchema"]
                    for branch in SPEC["components"]["schemas"]["StreamEvent"]["oneOf"]}

    async def scenario():
        async with serving(engine, model_dir) as s:
            async with s.client.post(s.url + "/v1/predict/stream?detail=1", data=jpeg(2),
                                     headers={"Content-Type": "image/jpeg"}) as r:
                assert_matches("/v1/predict/stream", "POST", r.status, r.content_type, b"", r.headers)
                return await read_events(r)

    events = asyncio.run(scenario())
    assert [name for name, _ in events] == ["stage", "result"]  # a classifier-only bundle, no vlm: no tokens
    for name, data in events:
        jsonschema.Draft202012Validator({**data_schemas[name], "components": SPEC["components"]}).validate(data)


def test_binary_infer_answer_matches_the_document(engine, model_dir):
    """Binary tensor data out: application/octet-stream with Inference-Header-Content-Length, as documented."""
    image = jpeg(3)
    head = orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4 + len(image)}}],
                         "parameters": {"binary_data_output": True}})

    async def scenario():
        async with serving(engine, model_dir) as s:
            async with s.client.post(s.url + "/v2/models/roadwork/infer",
                                     data=head + struct.pack("<I", len(image)) + image,
                                     headers={"Inference-Header-Content-Length": str(len(head))}) as r:
                return r.status, r.content_type, await r.read(), r.headers

    status, content_type, body, headers = asyncio.run(scenario())
    assert (status, content_type) == (200, "application/octet-stream")
    assert_matches("/v2/models/{model}/infer", "POST", status, content_type, body, headers)
    assert int(headers["Inference-Header-Content-Length"]) < len(body)


# --- schemathesis against `python -m server` ---------------------------------------------------------------

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, unsupported_method]  # the last: another method answers 405 with Allow
# Bounded: a few examples per operation, each request within the server's own 9 s deadline and a bit more; a fixed
# seed, so that CI runs the same requests every time (a new finding comes with a changed document or server).
# 503 and 504 are documented answers (overload, a deadline the client shortened): not_a_server_error fails on the
# rest of 5xx, and status_code_conformance on any status the document does not list.
SCHEMATHESIS_CONFIG = {"seed": 72, "request-timeout": 15, "generation": {"max-examples": 50, "database": "none"},
                       "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]}}}


@pytest.fixture(scope="module")
def live_schema(model_dir):
    with ServerProcess(model_dir) as server:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json",
                                            config=schemathesis.Config.from_dict(SCHEMATHESIS_CONFIG))


schema = schemathesis.pytest.from_fixture("live_schema")


@pytest.mark.timeout(300)
@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(case):
    case.call_and_validate(checks=CHECKS)
