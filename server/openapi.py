"""GET /openapi.json: the OpenAPI 3.1 document of every route the app registers, its parameters, bodies, answers and
errors. Built once per app from the dicts below; tests/test_openapi.py keeps it true (every route of app.router is
here with its methods and nothing else is, real answers validate, and schemathesis runs against `python -m server`)."""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from server.config import package_version
from server.payload import IMAGE_FIELD

JSON = "application/json"
REASONS = {400: "Bad request", 404: "Not found", 405: "Method not allowed", 408: "Request timeout",
           413: "Payload too large", 415: "Unsupported media type", 422: "Unprocessable image",
           500: "Internal server error", 503: "Service unavailable", 504: "Gateway timeout"}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def answer(description: str, schema: dict, media_type: str = JSON, headers: dict | None = None) -> dict:
    """One response; every one carries X-Request-ID (the middleware's, or the event stream's own header)."""
    return {"description": description, "content": {media_type: {"schema": schema}},
            "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}, **(headers or {})}}


def errors(kserve: bool, **codes: str) -> dict:
    """Error responses in the prefix's form: `codes` maps "e400" to the error codes that status carries."""
    out = {}
    for key, listed in codes.items():
        status = int(key[1:])
        headers = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}} if status == 503 else None
        out[str(status)] = answer(f"{REASONS[status]}: {listed}", ref("KServeError" if kserve else "Error"),
                                  headers=headers)
    return out


def flag(name: str, what: str) -> dict:
    """A boolean query flag (server/routes.py's _flag): 1/true/yes or 0/false/no, any case; anything else is 400."""
    return {"name": name, "in": "query", "required": False, "description": what,
            "schema": {"type": "string", "enum": ["1", "true", "yes", "0", "false", "no"]}}


def sse_event(name: str, data: dict) -> dict:
    return {"type": "object", "required": ["event", "data"],
            "properties": {"event": {"const": name},
                           "data": {"type": "string", "contentMediaType": JSON, "contentSchema": data}}}


def number_map() -> dict:
    return {"type": "object", "additionalProperties": {"type": "number"}}


DETAIL = flag("detail", "add per-stage scores, detector scores and boxes, and the VLM's token counts")
EXPLAIN = flag("explain", "add the VLM's explanation (bundles with a vlm stage; else 400 explain_unavailable)")
CAPTURE = flag("capture", "offer the image to the hard-case capture (--hardcases)")

# Failures of reading a body, shared by every route that takes one (server/body.py) and of the images in it.
BODY_ERRORS = {"e408": "body_timeout",
               "e500": "internal_error, inference_failed",
               "e503": "queue_full, shutting_down, busy_reading, too_many_connections",
               "e504": "deadline_exceeded, decode_timeout"}
IMAGE_ERRORS = {"e422": "undecodable_image, image_too_large, image_refused, unprocessable_image"}
BASE64_400 = "invalid_json, missing_field, invalid_field, invalid_base64"
BASE64 = {"type": "string", "minLength": 1, "contentEncoding": "base64"}
# A 1x1 PNG.
EXAMPLE_IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="

SINGLE_IMAGE_BODY = {
    "required": True,
    "description": "The image as raw bytes (any image/* type is taken: the format, JPEG, PNG or WebP, is read from "
                   "the bytes), as base64 in JSON, or as a multipart form part named 'image' (other parts ignored).",
    "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}}
           for t in ("image/jpeg", "image/png", "image/webp", "application/octet-stream")},
        JSON: {"schema": ref("ImageJson"), "example": {"image": EXAMPLE_IMAGE}},
        "multipart/form-data": {
            "schema": {"type": "object", "required": [IMAGE_FIELD],
                       "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}}},
            "encoding": {IMAGE_FIELD: {"contentType": "image/jpeg, image/png, image/webp, application/octet-stream"}},
        },
    },
}
SINGLE_IMAGE_ERRORS = {
    "e400": f"invalid_query, explain_unavailable, empty_body, invalid_multipart, {BASE64_400}",
    "e413": "body_too_large, images_too_large",
    "e415": "unsupported_media_type",
    **IMAGE_ERRORS,
    **BODY_ERRORS,
    "e500": "internal_error, inference_failed, explanation_failed",
    "e503": f"{BODY_ERRORS['e503']}, explanations_busy",
    "e504": f"{BODY_ERRORS['e504']}, explanation_timeout",
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": {"type": "string", "description": "stable, machine-readable"},
                           "message": {"type": "string"},
                           "request_id": {"type": "string", "description": "on 5xx: the id in the server's log"}}}},
    },
    "KServeError": {"type": "object", "required": ["error"], "additionalProperties": False,
                    "properties": {"error": {"type": "string"}}},
    "ImageJson": {
        "type": "object", "required": ["image"],
        "properties": {"image": {**BASE64, "description": "base64 (a data: URL prefix, whitespace, the URL-safe "
                                                         "alphabet and missing padding are accepted)"}},
    },
    "TokenCounts": {
        "type": "object", "required": ["prompt", "cached", "generated"], "additionalProperties": False,
        "properties": {k: {"type": "integer", "minimum": 0} for k in ("prompt", "cached", "generated")},
    },
    "Prediction": {
        "type": "object", "additionalProperties": False,
        "required": ["prediction", "label", "stage", "cached", "degraded", "timings_ms"],
        "properties": {
            "prediction": {"type": "number", "minimum": 0, "maximum": 1, "description": "P(roadwork)"},
            "label": {"enum": ["roadwork", "none"]},
            "stage": {"type": "string", "description": "the cascade stage that decided"},
            "cached": {"type": "boolean"},
            "degraded": {"type": "boolean", "description": "a later stage failed; an earlier stage's answer stands"},
            "timings_ms": {"type": "object", "required": ["decode", "queue", "compute", "total"],
                           "additionalProperties": False,
                           "properties": {k: {"type": "number", "minimum": 0}
                                          for k in ("decode", "queue", "compute", "total")}},
            "explanation": {"type": "string", "description": "explain=1, or the bundle's explain_above rule"},
            "tokens": {"oneOf": [ref("TokenCounts"), {"type": "null"}], "description": "detail=1; null when the "
                                                                                       "VLM did not see the image"},
            "scores": {**number_map(), "description": "detail=1: each stage's P(roadwork)"},
            "detector_scores": number_map(),
            "detector_ms": number_map(),
            "boxes": {"type": "array", "items": {
                "type": "object", "required": ["detector", "label", "score", "xyxy"], "additionalProperties": False,
                "properties": {"detector": {"type": "string"}, "label": {"type": "string"},
                               "score": {"type": "number"},
                               "xyxy": {"type": "array", "items": {"type": "number"}, "minItems": 4,
                                        "maxItems": 4, "description": "pixels of the original image"}}}},
        },
    },
    # One event of /v1/predict/stream, its data one line of JSON: before OpenAPI 3.2's itemSchema, a text/event-stream
    # response's schema describes each event (what schemathesis validates every event against).
    "StreamEvent": {"oneOf": [
        sse_event("stage", {"type": "object", "required": ["stage", "p", "decided"], "additionalProperties": False,
                            "properties": {"stage": {"type": "string"}, "p": {"type": "number"},
                                           "decided": {"type": "boolean"}}}),
        sse_event("token", {"type": "object", "required": ["text"], "additionalProperties": False,
                            "properties": {"text": {"type": "string"}}}),
        sse_event("result", ref("Prediction")),
        sse_event("error", ref("Error")),
    ]},
    "Status": {"type": "object", "required": ["status"], "additionalProperties": False,
               "properties": {"status": {"enum": ["alive", "ready", "warming_up", "failed", "saturated"]}}},
    "InferRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {
                "timeout": {"type": "number", "description": "microseconds; shortens the server's deadline"},
                "binary_data_output": {"type": "boolean"},
                "capture": {"type": "boolean", "description": "offer the images to the hard-case capture"}}},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object", "required": ["name", "datatype", "shape"],
                "properties": {
                    "name": {"const": "image"},
                    "datatype": {"const": "BYTES"},
                    "shape": {"type": "array", "minItems": 1, "items": False, "description": "[N] or [N, 1]",
                              "prefixItems": [{"type": "integer", "minimum": 1}, {"const": 1}]},
                    "data": {"type": "array", "description": "N base64 strings (without binary tensor data)",
                             "items": {"oneOf": [BASE64, {"type": "array", "items": BASE64, "minItems": 1,
                                                          "maxItems": 1}]}},
                    "parameters": {"type": "object", "properties": {
                        "binary_data_size": {"type": "integer", "minimum": 0}}}}}},
            "outputs": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"enum": ["prediction", "label", "stage"]},
                               "parameters": {"type": "object",
                                              "properties": {"binary_data": {"type": "boolean"}}}}}},
        },
    },
    "InferResponse": {
        "type": "object", "required": ["model_name", "model_version", "outputs"],
        "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name", "datatype", "shape"],
                "properties": {"name": {"enum": ["prediction", "label", "stage"]},
                               "datatype": {"enum": ["FP32", "BYTES"]},
                               "shape": {"type": "array", "items": {"type": "integer"}},
                               "data": {"type": "array", "items": {"type": ["number", "string"]}},
                               "parameters": {"type": "object", "properties": {
                                   "binary_data_size": {"type": "integer", "minimum": 0}}}}}},
        },
    },
    "TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"],
                       "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                      "shape": {"type": "array", "items": {"type": "integer"}}}},
    "ModelStats": {
        "type": "object",
        "required": ["name", "version", "last_inference", "inference_count", "execution_count", "inference_stats"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "last_inference": {"type": "integer"}, "inference_count": {"type": "integer"},
                       "execution_count": {"type": "integer"},
                       "inference_stats": {"type": "object", "additionalProperties": {
                           "type": "object", "required": ["count", "ns"],
                           "properties": {"count": {"type": "integer"}, "ns": {"type": "integer"}}}},
                       "batch_stats": {"type": "array"}},
    },
}

V1_PATHS: dict[str, Any] = {
    "/v1/predict": {"post": {
        "summary": "Is there roadwork in this image?",
        "parameters": [DETAIL, EXPLAIN, CAPTURE],
        "requestBody": SINGLE_IMAGE_BODY,
        "responses": {"200": answer("The answer", ref("Prediction")), **errors(False, **SINGLE_IMAGE_ERRORS)},
    }},
    "/v1/predict/batch": {"post": {
        "summary": "Many images in one request: one answer or one error per image, in order",
        "parameters": [DETAIL, EXPLAIN, CAPTURE],
        "requestBody": {"required": True, "content": {JSON: {"example": {"images": [EXAMPLE_IMAGE]}, "schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "minItems": 1, "items": BASE64,
                                      "description": "at most --max-batch-images"}}}}}},
        "responses": {
            "200": answer("One entry per image: its answer, or its error (a bad image fails only itself)", {
                "type": "object", "required": ["results"], "additionalProperties": False,
                "properties": {"results": {"type": "array",
                                           "items": {"anyOf": [ref("Prediction"), ref("Error")]}}}}),
            **errors(False, e400=f"invalid_query, explain_unavailable, {BASE64_400}",
                     e413="body_too_large, too_many_images, images_too_large", e415="unsupported_media_type",
                     **{**BODY_ERRORS, "e503": f"{BODY_ERRORS['e503']}, explanations_busy"}),
        },
    }},
    "/v1/predict/stream": {"post": {
        "summary": "The /v1/predict body in, server-sent events out",
        "description": "`stage` events ({stage, p, decided}) as each stage decides, `token` events ({text}) while "
                       "the explanation decodes, then `result` (the /v1/predict answer, with tokens). After the "
                       "stream opened a failure is one `error` event ({error: {code, message}}) ending it; before, "
                       "the JSON errors below. explain defaults to on when the bundle has a vlm stage.",
        "parameters": [DETAIL, EXPLAIN, CAPTURE],
        "requestBody": SINGLE_IMAGE_BODY,
        "responses": {"200": {"description": "stage events, token events, then one result or error event",
                              "content": {"text/event-stream": {"schema": ref("StreamEvent")}}},
                      **errors(False, **SINGLE_IMAGE_ERRORS)},
    }},
    "/ImageSynapse": {"post": {
        "summary": "The subnet's ImageSynapse: `prediction` filled in, every other field handed back unchanged",
        "requestBody": {"required": True, "content": {JSON: {
            "example": {"name": "ImageSynapse", "image": EXAMPLE_IMAGE, "timeout": 12.0},
            "schema": {"type": "object", "required": ["image"],
                       "properties": {"image": BASE64,
                                      "timeout": {"type": "number",
                                                  "description": "seconds; a shorter one is the deadline"}}}}}},
        "responses": {
            "200": answer("The synapse as sent, with prediction", {
                "type": "object", "required": ["prediction"],
                "properties": {"prediction": {"type": "number", "minimum": 0, "maximum": 1}}}),
            **errors(False, e400=BASE64_400, e413="body_too_large, images_too_large",
                     e415="unsupported_media_type", **IMAGE_ERRORS, **BODY_ERRORS),
        },
    }},
    "/healthz": {"get": {"summary": "The process is alive",
                         "responses": {"200": answer("Alive", ref("Status"))}}},
    "/readyz": {"get": {
        "summary": "Ready to answer: warmed up and not saturated",
        "responses": {"200": answer("Ready", ref("Status")),
                      "503": answer("warming_up, failed (warmup), or saturated (every decode thread stuck)",
                                    ref("Status"),
                                    headers={"Retry-After": {"$ref": "#/components/headers/Retry-After"}})},
    }},
    "/v1/models": {"get": {
        "summary": "The loaded stages (Engine.describe(), paths relative to the bundle) and the server's settings",
        "responses": {"200": answer("The model and settings", {
            "type": "object", "required": ["ready", "engine", "server"], "additionalProperties": False,
            "properties": {"ready": {"type": "boolean"}, "engine": {"type": "object"},
                           "server": {"type": "object"}}})},
    }},
    "/metrics": {"get": {"summary": "Prometheus metrics",
                         "responses": {"200": answer("Prometheus text format", {"type": "string"}, "text/plain")}}},
    "/openapi.json": {"get": {"summary": "This document",
                              "responses": {"200": answer("OpenAPI 3.1", {"type": "object"})}}},
}

MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}, "example": "roadwork",
         "description": "the bundle directory's name, or 'roadwork'"}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}, "example": "1",
           "description": "the only version is '1'"}
UNKNOWN_MODEL = "not_found (an unknown model or version)"


def model_paths(base: str, parameters: list[dict]) -> dict:
    """The routes under one model (server/kserve.py registers them with and without /versions/{version})."""
    found = errors(True, e404=UNKNOWN_MODEL)
    return {
        base: {"get": {"summary": "Model metadata", "parameters": parameters, "responses": {
            "200": answer("Inputs and outputs", {
                "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                               "platform": {"type": "string"},
                               "inputs": {"type": "array", "items": ref("TensorMetadata")},
                               "outputs": {"type": "array", "items": ref("TensorMetadata")}}}), **found}}},
        base + "/ready": {"get": {"summary": "Model ready", "parameters": parameters, "responses": {
            "200": answer("Ready", {"type": "object", "required": ["ready"],
                                    "properties": {"ready": {"const": True}}}),
            **errors(True, e404=UNKNOWN_MODEL, e503="not_ready (warming up)")}}},
        base + "/config": {"get": {"summary": "Triton's model configuration", "parameters": parameters,
                                   "responses": {"200": answer("Model configuration", {
                                       "type": "object", "required": ["name", "max_batch_size", "input", "output"]}),
                                       **found}}},
        base + "/stats": {"get": {"summary": "Triton's statistics extension", "parameters": parameters,
                                  "responses": {"200": answer("Statistics", {
                                      "type": "object", "required": ["model_stats"],
                                      "properties": {"model_stats": {"type": "array", "items": ref("ModelStats")}}}),
                                      **found}}},
        base + "/infer": {"post": {
            "summary": "Inference over BYTES tensor 'image'",
            "parameters": [*parameters, {
                "name": "Inference-Header-Content-Length", "in": "header", "required": False,
                "schema": {"type": "integer"},
                "description": "binary tensor data: the JSON header's length; the tensors' bytes follow it"}],
            "requestBody": {"required": True, "content": {
                JSON: {"schema": ref("InferRequest"), "example": {
                    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [EXAMPLE_IMAGE]}],
                    "outputs": [{"name": "prediction"}, {"name": "label"}]}},
                "application/octet-stream": {"schema": {
                    "type": "string", "format": "binary",
                    "description": "the JSON header, then each image as a 4-byte little-endian length and its "
                                   "bytes"}}}},
            "responses": {
                "200": {"description": "The outputs; binary ones after the JSON header (binary tensor data)",
                        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
                                    "Inference-Header-Content-Length": {
                                        "schema": {"type": "integer"},
                                        "description": "with binary outputs: the JSON header's length"}},
                        "content": {JSON: {"schema": ref("InferResponse")},
                                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                **errors(True, e400=f"{BASE64_400}, invalid_header, invalid_tensor", e404=UNKNOWN_MODEL,
                         e413="body_too_large, too_many_images, images_too_large", **IMAGE_ERRORS, **BODY_ERRORS),
            },
        }},
    }


V2_PATHS: dict[str, Any] = {
    "/v2": {"get": {"summary": "Server metadata", "responses": {"200": answer("Name, version, extensions", {
        "type": "object", "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}}})}}},
    "/v2/health/live": {"get": {"summary": "Live", "responses": {"200": answer("Live", {
        "type": "object", "required": ["live"], "properties": {"live": {"const": True}}})}}},
    "/v2/health/ready": {"get": {"summary": "Ready", "responses": {
        "200": answer("Ready", {"type": "object", "required": ["ready"], "properties": {"ready": {"const": True}}}),
        **errors(True, e503="not_ready (warming up)")}}},
    "/v2/models/stats": {"get": {"summary": "Statistics of the served model", "responses": {
        "200": answer("Statistics", {"type": "object", "required": ["model_stats"],
                                     "properties": {"model_stats": {"type": "array", "items": ref("ModelStats")}}})}}},
    "/v2/repository/index": {"post": {"summary": "The model repository: the one model", "responses": {
        "200": answer("The model, its version and state", {"type": "array", "items": {
            "type": "object", "required": ["name", "version", "state"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "state": {"enum": ["READY", "UNAVAILABLE"]}}}})}}},
    **model_paths("/v2/models/{model}", [MODEL]),
    **model_paths("/v2/models/{model}/versions/{version}", [MODEL, VERSION]),
}


def openapi_document() -> dict:
    # Answers the app gives on no route of its own, in the form of the path's prefix.
    unrouted = {"NotFound": answer("No such route", ref("Error")),
                "MethodNotAllowed": answer("The route takes other methods", ref("Error"), headers={
                    "Allow": {"schema": {"type": "string"}, "required": True}}),
                "KServeNotFound": answer("No such route under /v2", ref("KServeError")),
                "KServeMethodNotAllowed": answer("The route under /v2 takes other methods", ref("KServeError"),
                                                 headers={"Allow": {"schema": {"type": "string"}, "required": True}})}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "roadwork-cascade",
            "version": package_version(),
            "description": "Is there roadwork in this street image? Errors are {\"error\": {\"code\", \"message\"}} "
                           "outside /v2 and KServe's {\"error\": \"<message>\"} under /v2. An unknown path answers "
                           "404 and a known one with another method 405 with Allow (components/responses), and every "
                           "GET route outside /v2 also answers HEAD.",
        },
        "paths": {**V1_PATHS, **V2_PATHS},
        "components": {
            "schemas": SCHEMAS,
            "responses": unrouted,
            "headers": {
                "X-Request-ID": {"schema": {"type": "string"}, "description": "the request's id in the server's "
                                                                              "log: the client's own when plain"},
                "Retry-After": {"schema": {"type": "string"}, "description": "seconds"},
            },
        },
    }


def add_openapi_route(app: web.Application) -> None:
    body = orjson.dumps(openapi_document())  # once per app: the document never changes while it serves

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=JSON)

    app.router.add_get("/openapi.json", openapi_json)
