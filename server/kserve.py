"""The KServe v2 / Triton HTTP protocol over the same Service as /v1/predict (same batching, deadlines, admission,
cache, hard-case capture): what NVIDIA's tritonclient and KServe clients speak.

  GET  /v2                                     server metadata (extensions: binary_tensor_data, statistics)
  GET  /v2/health/live, /v2/health/ready
  GET  /v2/models/{name}[/versions/1]          model metadata; name: the bundle directory's name, or "roadwork"
  GET  /v2/models/{name}[/versions/1]/ready
  POST /v2/models/{name}[/versions/1]/infer    input "image": BYTES [N] or [N, 1] of encoded images (binary
                                               tensor data, or base64 strings in JSON); outputs "prediction" FP32
                                               [N], and "label" / "stage" BYTES [N] when requested
  GET  /v2/models[/{name}[/versions/1]]/stats  Triton's statistics extension

Request parameters: "timeout" (microseconds; shortens the server's deadline), "binary_data_output", "capture"
(offer the images to the hard-case capture). Errors are {"error": "<message>"} with the status /v1/predict would
give; one image that fails fails the request (the protocol has no per-element errors)."""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from server.body import read_body
from server.errors import ApiError
from server.payload import decode_base64_image, parse_json_object

if TYPE_CHECKING:
    from server.service import Service

HEADER_LENGTH = "Inference-Header-Content-Length"
VERSION = "1"
ALIAS = "roadwork"
INPUT = "image"
OUTPUTS = {"prediction": "FP32", "label": "BYTES", "stage": "BYTES"}
SERVER_VERSION = "0.1.0"


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    """Cumulative, over this protocol's infer requests: success/fail per request (wall time); queue, compute_input
    (decode), compute_infer (the batch's Engine.predict time) and cache_miss per computed image; cache_hit per
    cached image."""
    inference_count: int = 0      # images answered
    execution_count: int = 0      # requests that computed at least one image
    last_inference_ms: int = 0
    durations: dict[str, Duration] = field(default_factory=lambda: {
        kind: Duration() for kind in ("success", "fail", "queue", "compute_input", "compute_infer",
                                      "compute_output", "cache_hit", "cache_miss")})

    def as_json(self, name: str) -> dict:
        return {"name": name, "version": VERSION, "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {k: {"count": d.count, "ns": d.ns} for k, d in self.durations.items()},
                "batch_stats": []}


def json_ok(payload: object) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensor data) of a request with the binary tensor extension, or (body, empty)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 < length <= len(body):
        raise ApiError(400, "invalid_header", f"{HEADER_LENGTH}: {header_length!r} must be an integer in 1.."
                                              f"{len(body)} (the body's length)")
    return body[:length], memoryview(body)[length:]


def unpack_bytes(raw: memoryview, count: int) -> list[bytes]:
    """A BYTES tensor in binary form: each element a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ApiError(400, "invalid_tensor", f"input '{INPUT}': binary data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise ApiError(400, "invalid_tensor", f"input '{INPUT}': element {len(out)} claims {n} bytes, "
                                                  f"{len(raw) - at} are left")
        out.append(bytes(raw[at:at + n]))
        at += n
    if len(out) != count:
        raise ApiError(400, "invalid_tensor", f"input '{INPUT}': shape says {count} elements, the binary data "
                                              f"holds {len(out)}")
    return out


def pack_bytes(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


@dataclass
class InferRequest:
    id: str | None
    images: list[bytes | ApiError]
    outputs: dict[str, bool]      # output name -> binary
    timeout_s: float | None
    capture: bool


def parameters_of(element: dict, whose: str) -> dict:
    """The optional "parameters" object of a request, an input or an output; anything else but an object is a 400."""
    params = element.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "invalid_field", f"{whose} parameters must be an object")
    return params


def parse_infer(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    head, binary = split_body(body, header_length)
    payload = parse_json_object(head)
    params = parameters_of(payload, "the request's")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, "invalid_field", f"inputs must be a list of exactly one tensor, '{INPUT}'")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise ApiError(400, "invalid_field", f"unknown input {tensor.get('name')!r}; this model's input is '{INPUT}'")
    if tensor.get("datatype") != "BYTES":
        raise ApiError(400, "invalid_field", f"input '{INPUT}' must have datatype BYTES, got "
                                             f"{tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) in (1, 2) and all(type(d) is int for d in shape)
            and shape[0] >= 1 and (len(shape) == 1 or shape[1] == 1)):
        raise ApiError(400, "invalid_field", f"input '{INPUT}' shape must be [N] or [N, 1] with N >= 1, got {shape}")
    count = shape[0]
    if count > max_images:
        raise ApiError(413, "too_many_images", f"input '{INPUT}' has {count} images; the limit is {max_images}")
    size = parameters_of(tensor, f"input '{INPUT}'").get("binary_data_size")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary):
            raise ApiError(400, "invalid_tensor", f"input '{INPUT}': binary_data_size {size!r} exceeds the "
                                                  f"{len(binary)} binary bytes after the JSON header")
        images: list[bytes | ApiError] = list(unpack_bytes(binary[:size], count))
        binary = binary[size:]
    else:
        data = tensor.get("data")
        if isinstance(data, list) and len(shape) == 2:
            data = [row[0] if isinstance(row, list) and len(row) == 1 else row for row in data]
        if not isinstance(data, list) or len(data) != count:
            raise ApiError(400, "invalid_tensor", f"input '{INPUT}': data must be a list of {count} base64 strings "
                                                  f"(or use binary tensor data)")
        images = []
        for i, value in enumerate(data):
            try:
                images.append(decode_base64_image(value, f"{INPUT}[{i}]"))
            except ApiError as e:
                images.append(e)
    if len(binary):
        raise ApiError(400, "invalid_tensor", f"{len(binary)} bytes of binary data follow the inputs' data")
    binary_default = params.get("binary_data_output") is True
    outputs = {"prediction": binary_default}
    requested = payload.get("outputs")
    if requested is not None:
        if not isinstance(requested, list) or not requested:
            raise ApiError(400, "invalid_field", "outputs must be a non-empty list when given")
        outputs = {}
        for out in requested:
            name = out.get("name") if isinstance(out, dict) else None
            if name not in OUTPUTS:
                raise ApiError(400, "invalid_field", f"unknown output {name!r}; outputs are {', '.join(OUTPUTS)}")
            outputs[name] = parameters_of(out, f"output {name!r}").get("binary_data", binary_default) is True
    timeout_us = params.get("timeout")
    timeout_s = timeout_us / 1e6 if type(timeout_us) in (int, float) and timeout_us > 0 else None
    request_id = payload.get("id")
    return InferRequest(None if request_id is None else str(request_id), images, outputs, timeout_s,
                        params.get("capture") is True)


def infer_response(model: str, request: InferRequest, answers: list[dict]) -> web.Response:
    columns = {"prediction": [a["prediction"] for a in answers], "label": [a["label"] for a in answers],
               "stage": [a["stage"] for a in answers]}
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        tensor: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": [len(answers)]}
        if binary:
            raw = struct.pack(f"<{len(answers)}f", *columns[name]) if name == "prediction" else pack_bytes(columns[name])
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = columns[name]
        outputs.append(tensor)
    head: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    header = orjson.dumps(head)
    if not blobs:
        return web.Response(body=header, content_type="application/json")
    return web.Response(body=header + b"".join(blobs), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})


def add_kserve_routes(app: web.Application, service: Service) -> None:
    name = Path(service.engine.model_dir).name
    names = {name, ALIAS}
    stats = ModelStats()

    def model_of(request: web.Request) -> str:
        model = request.match_info["model"]
        version = request.match_info.get("version", VERSION)
        if model not in names:
            raise ApiError(404, "not_found", f"unknown model {model!r}; this server serves {name!r} (alias {ALIAS!r})")
        if version != VERSION:
            raise ApiError(404, "not_found", f"model {model!r} has no version {version!r}; its only version is "
                                             f"{VERSION!r}")
        return model

    def ready_response() -> web.Response:
        if not service.ready:
            raise ApiError(503, "not_ready", "warming up", {"Retry-After": "1"})
        return json_ok({"ready": True})

    async def server_metadata(request: web.Request) -> web.Response:
        return json_ok({"name": "roadwork-cascade", "version": SERVER_VERSION,
                        "extensions": ["binary_tensor_data", "statistics"]})

    async def live(request: web.Request) -> web.Response:
        return json_ok({"live": True})

    async def ready(request: web.Request) -> web.Response:
        return ready_response()

    async def model_ready(request: web.Request) -> web.Response:
        model_of(request)
        return ready_response()

    async def model_metadata(request: web.Request) -> web.Response:
        model = model_of(request)
        return json_ok({"name": model, "versions": [VERSION], "platform": "roadwork-cascade",
                        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
                        "outputs": [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS.items()]})

    async def model_config(request: web.Request) -> web.Response:
        """Triton's model configuration form, which tritonclient's get_model_config reads."""
        model = model_of(request)
        return json_ok({"name": model, "platform": "roadwork-cascade", "versions": [VERSION],
                        "max_batch_size": 0,  # one request carries up to max_batch_images images in one tensor
                        "input": [{"name": INPUT, "data_type": "TYPE_STRING", "dims": [-1]}],
                        "output": [{"name": n, "data_type": "TYPE_STRING" if t == "BYTES" else f"TYPE_{t}",
                                    "dims": [-1]} for n, t in OUTPUTS.items()]})

    async def repository_index(request: web.Request) -> web.Response:
        state = "READY" if service.ready else "UNAVAILABLE"
        return json_ok([{"name": name, "version": VERSION, "state": state}])

    async def model_stats(request: web.Request) -> web.Response:
        models = [model_of(request)] if "model" in request.match_info else [name]
        return json_ok({"model_stats": [stats.as_json(m) for m in models]})

    async def infer(request: web.Request) -> web.Response:
        start = time.monotonic()
        model = model_of(request)  # an unknown model is no failure of this one
        try:
            async with read_body(request, service, service.deadline(start)) as body:
                parsed = await service.offload(len(body), parse_infer, body, request.headers.get(HEADER_LENGTH),
                                               service.config.max_batch_images)
            answers = await service.predict(parsed.images, start, service.deadline(start, parsed.timeout_s),
                                            detail=False, capture=parsed.capture)
            for i, answer in enumerate(answers):
                if isinstance(answer, ApiError):
                    raise ApiError(answer.status, answer.code, f"{INPUT}[{i}]: {answer.message}", answer.headers)
        except (ApiError, web.HTTPException):
            stats.durations["fail"].add(time.monotonic() - start)
            raise
        record(answers, time.monotonic() - start)
        return infer_response(model, parsed, answers)

    def record(answers: list[dict], seconds: float) -> None:
        d = stats.durations
        d["success"].add(seconds)
        stats.inference_count += len(answers)
        stats.last_inference_ms = int(time.time() * 1e3)
        computed = [a for a in answers if not a["cached"]]
        stats.execution_count += bool(computed)
        for a in answers:
            t = a["timings_ms"]
            if a["cached"]:
                d["cache_hit"].add(t["total"] / 1e3)
                continue
            d["cache_miss"].add(0.0)
            d["queue"].add(t["queue"] / 1e3)
            d["compute_input"].add(t["decode"] / 1e3)
            d["compute_infer"].add(t["compute"] / 1e3)

    routes = [("GET", "/v2", server_metadata), ("GET", "/v2/health/live", live), ("GET", "/v2/health/ready", ready),
              ("GET", "/v2/models/stats", model_stats), ("POST", "/v2/repository/index", repository_index)]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [("GET", base, model_metadata), ("GET", base + "/ready", model_ready),
                   ("GET", base + "/config", model_config), ("POST", base + "/infer", infer),
                   ("GET", base + "/stats", model_stats)]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)  # errors: the app's middleware, in KServe's form under /v2
