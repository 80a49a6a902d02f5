"""The aiohttp application: routes, request parsing, the cache -> decode -> batch pipeline, error mapping."""
from __future__ import annotations

import asyncio
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import orjson
from aiohttp import web
from PIL import Image

from runtime.decode import ImageDecodeError, decode_image
from server.batcher import (BatcherClosed, Batcher, Computed, DeadlineExceeded, InferenceFailed, QueueFull,
                            WorkItem)
from server.cache import ResultCache, image_key
from server.config import ServerConfig
from server.errors import ApiError, error_response, from_http_exception, json_response
from server.metrics import ServerMetrics
from server.payload import decode_base64_image, parse_json_object, required_field

log = logging.getLogger(__name__)
request_log = logging.getLogger("server.requests")

# Bodies above this are parsed, base64-decoded and hashed on a thread instead of the event loop.
OFFLOAD_BYTES = 1 << 20
RETRY_AFTER_S = "1"


class Service:
    """Everything one app instance owns: engine, batcher, cache, decode threads, metrics, readiness."""

    def __init__(self, engine: Any, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics()
        self.cache = ResultCache(config.cache_entries, config.cache_bytes, config.cache_ttl_s)
        self.batcher = Batcher(engine, config.max_batch, config.max_delay_ms / 1000, config.queue_size,
                               self.metrics)
        self.decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        self.metrics.track(lambda: len(self.batcher), lambda: len(self.cache), lambda: self.cache.bytes,
                           engine.stage_states)
        self.ready = False
        self.warmup_task: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.batcher.start()
        self.warmup_task = asyncio.get_running_loop().create_task(self._warmup(), name="warmup")

    async def _warmup(self) -> None:
        start = time.perf_counter()
        # Decode threads start lazily and the first decode loads codecs: run one validator-sized JPEG on each.
        sample = _warmup_jpeg()
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, decode_image, sample)
                                         for _ in range(self.config.decode_threads)))
        try:
            await self.batcher.run_on_worker(self.engine.warmup)
            await self.batcher.run_on_worker(self.engine.predict, decoded[:1])  # a real image, on the real thread
        except Exception:
            log.exception("warmup failed; the server will not become ready")
            raise
        took = time.perf_counter() - start
        self.metrics.warmup_duration.set(took)
        self.metrics.ready.set(1)
        self.ready = True
        log.info("warmed up in %.2f s; ready", took)

    async def stop(self) -> None:
        if self.warmup_task is not None and not self.warmup_task.done():
            self.warmup_task.cancel()
        await self.batcher.close()
        self.decode_pool.shutdown(wait=True)

    # --- the prediction pipeline -----------------------------------------------------------------------

    async def offload(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Small inputs run inline (a thread hop costs more than the work); large ones off the event loop."""
        if size <= OFFLOAD_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    async def _decode(self, data: bytes) -> tuple[Any, float]:
        start = time.perf_counter()
        try:
            image = await asyncio.get_running_loop().run_in_executor(
                self.decode_pool, decode_image, data, self.config.max_pixels)
        except ImageDecodeError as e:
            raise ApiError(422, e.code, str(e)) from None
        took = time.perf_counter() - start
        self.metrics.decode_latency.observe(took)
        return image, took

    async def predict(self, blobs: list[bytes | ApiError], start: float, deadline: float,
                      detail: bool) -> list[dict | ApiError]:
        """One answer or one error per image, in order. Raises ApiError only for whole-request failures."""
        answers: list[dict | ApiError | None] = [None] * len(blobs)
        keys: dict[int, bytes] = {}
        misses: list[int] = []
        for i, blob in enumerate(blobs):
            if isinstance(blob, ApiError):
                answers[i] = blob
                continue
            keys[i] = await self.offload(len(blob), image_key, blob)
            hit = self.cache.get(keys[i]) if self.cache.enabled else None
            if hit is not None:
                self.metrics.cache_hits.inc()
                answers[i] = _answer(hit, True, detail, total_s=time.monotonic() - start)
            else:
                if self.cache.enabled:
                    self.metrics.cache_misses.inc()
                misses.append(i)

        to_run: list[tuple[int, Any, float]] = []
        items: list[WorkItem] = []
        if misses:
            self._admit(len(misses), deadline)
            try:
                decoded = await asyncio.gather(*(self._decode(blobs[i]) for i in misses), return_exceptions=True)
                for i, outcome in zip(misses, decoded):
                    if isinstance(outcome, ApiError):
                        answers[i] = outcome
                    elif isinstance(outcome, BaseException):
                        raise outcome
                    else:
                        to_run.append((i, *outcome))
                if to_run:
                    items = self.batcher.submit([image for _, image, _ in to_run], deadline)
            finally:
                self.batcher.release(len(misses) - len(items))  # room of images that will not be queued

        if items:
            await self._await_items(to_run, items, keys, answers, start, deadline, detail)
        for answer in answers:
            if isinstance(answer, ApiError):
                self.metrics.images.labels(answer.code).inc()
            else:
                self.metrics.images.labels("cached" if answer["cached"] else "computed").inc()
        return answers

    def _admit(self, count: int, deadline: float) -> None:
        if count > self.batcher.queue_size:
            raise ApiError(413, "too_many_images", f"{count} images to compute exceed the queue size "
                                                   f"({self.batcher.queue_size}); send smaller batches")
        try:
            self.batcher.admit(count, deadline)
        except QueueFull as e:
            raise ApiError(503, "queue_full", f"server is overloaded: {e}", {"Retry-After": RETRY_AFTER_S}) from None
        except BatcherClosed as e:
            raise ApiError(503, "shutting_down", str(e), {"Retry-After": RETRY_AFTER_S}) from None

    async def _await_items(self, to_run: list[tuple[int, Any, float]], items: list[WorkItem],
                           keys: dict[int, bytes], answers: list, start: float, deadline: float,
                           detail: bool) -> None:
        try:
            _, pending = await asyncio.wait([item.future for item in items],
                                            timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            for item in items:
                self.batcher.abandon(item, "client_disconnected")
            raise
        for (i, _, decode_s), item in zip(to_run, items):
            if item.future in pending:
                self.batcher.abandon(item, "deadline")
                answers[i] = ApiError(504, "deadline_exceeded",
                                      f"no answer within the {self.config.timeout_s:g} s deadline")
                continue
            error = item.future.exception()
            if isinstance(error, DeadlineExceeded):
                answers[i] = ApiError(504, "deadline_exceeded", str(error))
            elif isinstance(error, InferenceFailed):
                answers[i] = ApiError(500, "inference_failed", str(error))
            elif error is not None:
                raise error
            else:
                computed: Computed = item.future.result()
                if not computed.result.degraded:  # a degraded answer may improve once the failing stage recovers
                    self.cache.put(keys[i], computed.result)
                answers[i] = _answer(computed.result, False, detail, total_s=time.monotonic() - start,
                                     decode_s=decode_s, queue_s=computed.queue_wait_s,
                                     compute_s=computed.compute_s)


def _answer(result: Any, cached: bool, detail: bool, total_s: float, decode_s: float = 0.0,
            queue_s: float = 0.0, compute_s: float = 0.0) -> dict:
    answer = {
        "prediction": result.prediction,
        "label": result.label,
        "stage": result.stage,
        "cached": cached,
        "degraded": result.degraded,
        "timings_ms": {"decode": round(decode_s * 1e3, 3), "queue": round(queue_s * 1e3, 3),
                       "compute": round(compute_s * 1e3, 3), "total": round(total_s * 1e3, 3)},
    }
    if detail:
        answer["scores"] = dict(result.scores)
        if result.detector_scores:
            answer["detector_scores"] = dict(result.detector_scores)
        if result.boxes is not None:
            answer["boxes"] = [{"detector": b.detector, "label": b.label, "score": b.score, "xyxy": list(b.xyxy)}
                               for b in result.boxes]
    return answer


def _warmup_jpeg() -> bytes:
    """224x224, JPEG quality 75: what the subnet's validators send."""
    gradient = np.linspace(0, 255, 224, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(gradient[None, :], gradient[:, None], gradient[::-1, None]), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


SERVICE = web.AppKey("service", Service)


# --- request parsing ---------------------------------------------------------------------------------------

def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _require_json(request: web.Request) -> None:
    if not _is_json(request.content_type):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {request.content_type!r} is not supported here; send application/json")


def _wants_detail(request: web.Request) -> bool:
    return request.query.get("detail", "0").lower() in ("1", "true", "yes")


def _extract_single(body: bytes, content_type: str) -> tuple[bytes, dict | None]:
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


def _deadline(service: Service, start: float, requested_s: object = None) -> float:
    timeout_s = service.config.timeout_s
    if isinstance(requested_s, (int, float)) and not isinstance(requested_s, bool) and requested_s > 0:
        timeout_s = min(timeout_s, float(requested_s))
    return start + timeout_s


# --- handlers ----------------------------------------------------------------------------------------------

async def predict(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    start = time.monotonic()
    content_type = request.content_type
    if not (_is_json(content_type) or content_type.startswith("image/")
            or content_type == "application/octet-stream"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {content_type!r} is not supported; send application/json or image/*")
    body = await request.read()
    data, _ = await service.offload(len(body), _extract_single, body, content_type)
    [answer] = await service.predict([data], start, _deadline(service, start), _wants_detail(request))
    if isinstance(answer, ApiError):
        raise answer
    return json_response(answer)


async def predict_batch(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    start = time.monotonic()
    _require_json(request)
    body = await request.read()
    blobs = await service.offload(len(body), _extract_batch, body, service.config.max_batch_images)
    answers = await service.predict(blobs, start, _deadline(service, start), _wants_detail(request))
    return json_response({"results": [a.body() if isinstance(a, ApiError) else a for a in answers]})


async def image_synapse(request: web.Request) -> web.Response:
    """The subnet's ImageSynapse as JSON: fill `prediction`, hand every other field back unchanged."""
    service = request.app[SERVICE]
    start = time.monotonic()
    _require_json(request)
    body = await request.read()
    data, synapse = await service.offload(len(body), _extract_single, body, "application/json")
    deadline = _deadline(service, start, synapse.get("timeout"))
    [answer] = await service.predict([data], start, deadline, detail=False)
    if isinstance(answer, ApiError):
        raise answer
    synapse["prediction"] = answer["prediction"]
    return json_response(synapse)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.ready:
        return json_response({"status": "ready"})
    task = service.warmup_task
    failed = task is not None and task.done() and (task.cancelled() or task.exception() is not None)
    return json_response({"status": "failed" if failed else "warming_up"}, status=503,
                         headers={"Retry-After": RETRY_AFTER_S})


async def models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    config = service.config
    server = {name: getattr(config, name) for name in (
        "max_batch", "max_delay_ms", "queue_size", "timeout_s", "max_body_mb", "max_pixels", "max_batch_images",
        "cache_entries", "cache_mb", "cache_ttl_s")}
    return json_response({"ready": service.ready, "engine": service.engine.describe(), "server": server})


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = request.app[SERVICE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


# --- middleware and factory --------------------------------------------------------------------------------

@web.middleware
async def observe(request: web.Request, handler: Callable) -> web.StreamResponse:
    """JSON errors for every failure, plus per-request metrics and a structured debug line."""
    start = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        try:
            response = await handler(request)
        except ApiError as e:
            response = error_response(e)
        except web.HTTPException as e:
            response = error_response(from_http_exception(e))
        except asyncio.CancelledError:
            status = 499  # client closed the connection before the answer
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = error_response(ApiError(500, "internal_error", "internal server error; see the server log"))
        status = response.status
        return response
    finally:
        took = time.perf_counter() - start
        server_metrics = request.app[SERVICE].metrics
        server_metrics.requests.labels(route, str(status)).inc()
        server_metrics.request_latency.labels(route).observe(took)
        if request_log.isEnabledFor(logging.DEBUG):
            request_log.debug(orjson.dumps({"method": request.method, "route": route, "status": status,
                                            "ms": round(took * 1e3, 3), "bytes_in": request.content_length,
                                            "remote": request.remote}).decode())


async def start_site(app: web.Application, host: str, port: int, access_log: bool = False,
                     shutdown_timeout_s: float = 30.0) -> tuple[web.AppRunner, str, int]:
    """Start serving app on host:port (0 picks a free port); returns the runner and the bound address."""
    runner = web.AppRunner(app, handler_cancellation=True,  # a client that hangs up cancels its handler
                           access_log=logging.getLogger("aiohttp.access") if access_log else None,
                           shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, bound_host, bound_port


def create_app(engine: Any, config: ServerConfig) -> web.Application:
    """One app serving one loaded Engine; warmup starts with the app and /readyz turns 200 when it ends."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[observe])
    service = Service(engine, config)
    app[SERVICE] = service
    app.router.add_post("/v1/predict", predict)
    app.router.add_post("/v1/predict/batch", predict_batch)
    app.router.add_post("/ImageSynapse", image_synapse)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics_endpoint)

    async def on_startup(_: web.Application) -> None:
        await service.start()

    async def on_shutdown(_: web.Application) -> None:
        service.ready = False  # load balancers stop routing here while in-flight requests finish
        service.metrics.ready.set(0)
        service.batcher.drain()  # nothing waits for a batch to fill any more

    async def on_cleanup(_: web.Application) -> None:
        await service.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
