"""The HTTP handlers of /v1, /ImageSynapse, health, models and metrics, and the request parsing they share; each
handler hands its images to the Service."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from server.answers import answer_json, computed_or_error
from server.batcher import WorkItem
from server.body import read_body
from server.cache import image_key
from server.errors import RETRY_AFTER_S, ApiError, json_response
from server.logs import REQUEST_ID
from server.payload import (IMAGE_FIELD, decode_base64_image, multipart_boundary, multipart_image, parse_json_object,
                            required_field)
from server.service import SERVICE, Service
from server.stream import EventStream

log = logging.getLogger(__name__)


# --- request parsing ---------------------------------------------------------------------------------------

def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _require_json(request: web.Request) -> None:
    if not _is_json(request.content_type):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {request.content_type!r} is not supported here; send application/json")


def _flag(request: web.Request, name: str, default: bool = False) -> bool:
    """A boolean query parameter: 1/true/yes or 0/false/no; anything else is a 400 naming it."""
    value = request.query.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ApiError(400, "invalid_query", f"query parameter {name}={value!r} must be 1/true/yes or 0/false/no")


def _wants_detail(request: web.Request) -> bool:
    return _flag(request, "detail")


def _extract_single(body: bytes, content_type: str, boundary: bytes | None = None) -> tuple[bytes, dict | None]:
    if boundary is not None:
        return multipart_image(body, boundary), None
    if _is_json(content_type):
        payload = parse_json_object(body)
        return decode_base64_image(required_field(payload, "image"), "image"), payload
    if not body:
        raise ApiError(400, "empty_body", "request body is empty; expected image bytes")
    return body, None


def _extract_batch(body: bytes, max_images: int) -> list[bytes | ApiError]:
    images = required_field(parse_json_object(body), "images")
    if not isinstance(images, list) or not images:
        raise ApiError(400, "invalid_field", "images must be a non-empty list of base64 strings")
    if len(images) > max_images:
        raise ApiError(413, "too_many_images", f"images has {len(images)} entries; the limit is {max_images}")
    blobs: list[bytes | ApiError] = []
    for index, value in enumerate(images):
        try:
            blobs.append(decode_base64_image(value, f"images[{index}]"))
        except ApiError as e:
            blobs.append(e)
    return blobs


# --- handlers ----------------------------------------------------------------------------------------------

def _require_single_image(request: web.Request) -> tuple[str, bytes | None]:
    """The request's media type, and the boundary of a multipart/form-data one."""
    content_type = request.content_type
    if content_type == "multipart/form-data":
        return content_type, multipart_boundary(request.headers.get("Content-Type", ""))
    if not (_is_json(content_type) or content_type.startswith("image/")
            or content_type == "application/octet-stream"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {content_type!r} is not supported; send image/*, application/json "
                       f"({{\"image\": base64}}) or multipart/form-data (an {IMAGE_FIELD!r} part)")
    return content_type, None


async def predict(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    start = time.monotonic()
    content_type, boundary = _require_single_image(request)
    detail, explain = _wants_detail(request), _flag(request, "explain")
    deadline = service.deadline(start)
    async with read_body(request, service, deadline) as body:
        data, _ = await service.offload(len(body), _extract_single, body, content_type, boundary)
    [answer] = await service.predict([data], start, deadline, detail, explain,
                                     _flag(request, "capture"))
    if isinstance(answer, ApiError):
        raise answer
    return json_response(answer)


async def predict_stream(request: web.Request) -> web.StreamResponse:
    """The /v1/predict body in, text/event-stream out: `stage` events as each stage decides, `token` events while
    the explanation decodes, then `result`. Failures before the stream opens are JSON errors like /v1/predict's;
    after, one `error` event ends the stream. A client that leaves cancels its work at once."""
    service = request.app[SERVICE]
    start = time.monotonic()
    content_type, boundary = _require_single_image(request)
    detail, explain = _wants_detail(request), _flag(request, "explain", default=service.has_vlm)
    service.check_explain(explain)
    with service.explaining(1 if explain else 0):
        return await _predict_stream(request, service, start, content_type, boundary, detail, explain)


async def _predict_stream(request: web.Request, service: Service, start: float, content_type: str,
                          boundary: bytes | None, detail: bool, explain: bool) -> web.StreamResponse:
    deadline = service.deadline(start)
    capture = _flag(request, "capture")  # a bad value is a 400 before the stream opens, not an error event in it
    async with read_body(request, service, deadline) as body:
        data, _ = await service.offload(len(body), _extract_single, body, content_type, boundary)
    key = await service.offload(len(data), image_key, data)
    hit = service.cached(key, explain) or await service.cached_shared(key, explain)
    stages: asyncio.Queue[dict | None] = asyncio.Queue()
    submitted = None if hit is not None else await service.submit_one(
        data, deadline, lambda stage, p, decided: stages.put_nowait({"stage": stage, "p": p, "decided": decided}))
    events = EventStream(request)
    outcome = "completed"
    try:
        await events.open()
        if submitted is None:
            result, answer = hit, answer_json(hit, True, detail, explain, total_s=time.monotonic() - start)
            if hit.explanation is not None:
                await events.send("token", {"text": hit.explanation})
        else:
            result, answer = await _stream_computed(service, events, key, submitted, stages, start, deadline,
                                                    detail, explain)
        answer["tokens"] = result.tokens
        service.count_image(answer)
        if service.hardcases is not None:
            service.hardcases.offer(data, result, capture)
        await events.send("result", answer)
        await events.close()
    except ApiError as e:
        outcome = e.code
        service.count_image(e)
        with contextlib.suppress(ConnectionResetError):
            await events.send("error", e.body())
    except ConnectionResetError:
        outcome = "client_disconnected"
    except asyncio.CancelledError:
        outcome = "client_disconnected"
        raise
    except Exception:  # the headers are gone: the middleware's JSON 500 cannot be sent any more
        log.exception("request %s: unhandled error on %s %s after its event stream opened", REQUEST_ID.get(),
                      request.method, request.path)
        outcome = "internal_error"
        with contextlib.suppress(ConnectionResetError):
            await events.send("error", ApiError(500, outcome, f"internal server error; request id "
                                                              f"{REQUEST_ID.get()}").body())
    finally:
        if submitted is not None:
            service.batcher.abandon(submitted[0], outcome)  # no-op once answered
        service.metrics.streams.labels(outcome).inc()
    return events.response


async def _stream_computed(service: Service, events: EventStream, key: bytes,
                           submitted: tuple[WorkItem, np.ndarray, float, int], stages: asyncio.Queue, start: float,
                           deadline: float, detail: bool, explain: bool) -> tuple[Any, dict]:
    """Stage events until the image's batch resolves, then the explanation's tokens; the final ImageResult and
    its answer."""
    item, image, decode_s, scale = submitted
    item.future.add_done_callback(lambda _: stages.put_nowait(None))  # queued after every stage event
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            while (decision := await stages.get()) is not None:
                await events.send("stage", decision)
    except TimeoutError:
        service.batcher.abandon(item, "deadline")
        raise ApiError(504, "deadline_exceeded", f"no answer within the {service.config.timeout_s:g} s deadline") \
            from None
    computed = computed_or_error(item)
    if isinstance(computed, ApiError):
        raise computed
    result = computed.result
    if not service.explains_unasked(result):  # else remembered once explained
        service.remember(key, result)
    if explain:
        result = await service.explain(key, image, result, events)
    elif service.explains_unasked(result):
        with service.spare_explanations(1) as spare:
            if spare:
                result = await service.explain(key, image, result, events)
    return result, answer_json(result, False, detail, explain, total_s=time.monotonic() - start, decode_s=decode_s,
                           queue_s=computed.queue_wait_s, compute_s=computed.compute_s, scale=scale)


async def predict_batch(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    start = time.monotonic()
    _require_json(request)
    detail, explain = _wants_detail(request), _flag(request, "explain")
    deadline = service.deadline(start)
    async with read_body(request, service, deadline) as body:
        blobs = await service.offload(len(body), _extract_batch, body, service.config.max_batch_images)
    answers = await service.predict(blobs, start, deadline, detail, explain,
                                    _flag(request, "capture"))
    return json_response({"results": [a.body() if isinstance(a, ApiError) else a for a in answers]})


async def image_synapse(request: web.Request) -> web.Response:
    """The subnet's ImageSynapse as JSON: fill `prediction`, hand every other field back unchanged."""
    service = request.app[SERVICE]
    start = time.monotonic()
    _require_json(request)
    async with read_body(request, service, service.deadline(start)) as body:
        data, synapse = await service.offload(len(body), _extract_single, body, "application/json")
    deadline = service.deadline(start, synapse.get("timeout"))
    [answer] = await service.predict([data], start, deadline, detail=False)
    if isinstance(answer, ApiError):
        raise answer
    synapse["prediction"] = answer["prediction"]
    return json_response(synapse)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.ready and service.saturated():
        return json_response({"status": "saturated"}, status=503, headers={"Retry-After": RETRY_AFTER_S})
    if service.ready:
        return json_response({"status": "ready"})
    task = service.warmup_task
    failed = task is not None and task.done() and (task.cancelled() or task.exception() is not None)
    return json_response({"status": "failed" if failed else "warming_up"}, status=503,
                         headers={"Retry-After": RETRY_AFTER_S})


async def models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    config = service.config
    server = {"max_batch": service.engine.max_batch} | {name: getattr(config, name) for name in (
        "max_delay_ms", "queue_size", "timeout_s", "max_body_mb", "max_pixels", "max_aspect_ratio", "max_jpeg_scans",
        "max_batch_images", "max_explanations", "cache_entries", "cache_mb", "cache_ttl_s")}
    engine = _relative_paths(service.engine.describe(), Path(service.engine.model_dir))
    return json_response({"ready": service.ready, "engine": engine, "server": server})


def _relative_paths(described: Any, root: Path) -> Any:
    """Engine.describe() with every filesystem path shown relative to the bundle directory ("." for itself):
    clients learn which model is served, not where the server's files are."""
    if isinstance(described, dict):
        return {k: _relative_paths(v, root) for k, v in described.items()}
    if isinstance(described, list):
        return [_relative_paths(v, root) for v in described]
    if isinstance(described, str) and os.path.isabs(described):
        path = Path(described)
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    return described


async def metrics_endpoint(request: web.Request) -> web.Response:
    # Off the event loop: Engine.vlm_stats() waits for the VLM loop thread, which answers between model steps.
    body, content_type = await asyncio.get_running_loop().run_in_executor(None, request.app[SERVICE].metrics.render)
    return web.Response(body=body, headers={"Content-Type": content_type})


# --- middleware and factory --------------------------------------------------------------------------------


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/predict", predict)
    app.router.add_post("/v1/predict/batch", predict_batch)
    app.router.add_post("/v1/predict/stream", predict_stream)
    app.router.add_post("/ImageSynapse", image_synapse)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics_endpoint)
