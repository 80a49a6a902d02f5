"""The aiohttp application: routes, request parsing, the cache -> decode -> batch pipeline, error mapping."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import orjson
from aiohttp import web
from PIL import Image

from runtime.cascade.results import TokenCounts, add_tokens
from runtime.errors import InputError
from runtime.image_decode import DecodeLimits, ImageDecodeError, ImageInfo, decode_image, decode_probed, probe_image
from server.batcher import (BatcherClosed, Batcher, Computed, DeadlineExceeded, InferenceFailed, QueueFull,
                            StageListener, WorkItem)
from server.body import RETRY_AFTER_S, read_body
from server.cache import ResultCache, image_key
from server.config import ServerConfig
from server.errors import ApiError, error_response_for, from_http_exception, json_response
from server.guard import ByteBudget, CappedRunner, ConnectionCap
from server.hardcases import hard_case_capture
from server.kserve import add_kserve_routes
from server.logs import ACCESS_LOG_FORMAT, REQUEST_ID
from server.metrics import ServerMetrics
from server.openapi import add_openapi_route
from server.payload import (IMAGE_FIELD, decode_base64_image, multipart_boundary, multipart_image, parse_json_object,
                            required_field)
from server.stream import EventStream, Explanation

if TYPE_CHECKING:  # the engine pulls in torch and the models; --help stays fast without them
    from runtime.cascade.engine import Engine
    from server.redis_cache import RedisCache

log = logging.getLogger(__name__)
request_log = logging.getLogger("server.requests")

# Bodies above this are parsed, base64-decoded and hashed on a thread instead of the event loop.
OFFLOAD_BYTES = 1 << 20
# /readyz says "saturated" while every decode thread has been busy on one image for longer than this.
DECODE_STALL_S = 1.0
# Refusing before the body: bodies up to this are drained and the connection kept (a reconnect costs more than
# reading them); larger ones close the connection unread.
DRAIN_BELOW_BYTES = 256 << 10
# A queue-full refusal is answered after this pause: clients that resend at once after a 503 (closed loop, no
# backoff) would otherwise spend on refusals the CPU that computing needs. A sleeping handler costs no CPU.
REFUSAL_PACE_S = 0.1
DECODE_ERROR_STATUS = {"undecodable_image": 422, "image_too_large": 422, "image_refused": 422,
                       "decode_timeout": 504}


class Service:
    """Everything one app instance owns: engine, batcher, cache, decode threads, metrics, readiness."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics()
        self.cache = ResultCache(config.cache_entries, config.cache_bytes, config.cache_ttl_s)
        self.batcher = Batcher(engine, config.batch_size, config.max_delay_ms / 1000, config.queue_size,
                               self.metrics, config.decode_memory_bytes)
        self.decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        self.limits = DecodeLimits(config.max_pixels, config.max_aspect_ratio, config.max_jpeg_scans)
        self.decoding: dict[int, float] = {}  # decode thread id -> when its current decode started
        self.bodies = ByteBudget(config.body_memory_bytes)
        self.connections = ConnectionCap(config.max_connections, config.max_connections_per_ip)
        self.explanations = 0  # explanations decoding now (max_explanations)
        self.metrics.admitted_bytes.set_function(lambda: self.batcher.bytes_held)
        self.metrics.body_bytes.set_function(lambda: self.bodies.held)
        self.metrics.connections.set_function(lambda: self.connections.total)
        self.metrics.explanations.set_function(lambda: self.explanations)
        self.metrics.track(lambda: len(self.batcher), lambda: len(self.cache), lambda: self.cache.bytes,
                           engine.stage_states, engine.vlm_stats, engine.stage_timings, engine.member_timings)
        self.metrics.report_precision(None if engine.precision is None else engine.precision.describe())
        self.has_vlm = engine.vlm_stats() is not None
        self.explain_above = engine.explain_above  # the bundle's rule: results above it are explained unasked
        self.hardcases = hard_case_capture(engine, config, self.metrics)  # None without --hardcases
        self.shared = shared_cache(engine, config, self.metrics)
        self.ready = False
        self.warmup_task: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.hardcases is not None:
            self.hardcases.start()
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
        """Runs what is queued, then stops. Nothing here joins a thread: decodes end by their deadline, and
        __main__ bounds the whole shutdown by --shutdown-timeout-s."""
        if self.warmup_task is not None and not self.warmup_task.done():
            self.warmup_task.cancel()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        await self.batcher.close()
        if self.hardcases is not None:  # after the batcher: every answer has been offered
            await asyncio.to_thread(self.hardcases.close)
        if self.shared is not None:
            await self.shared.close()

    def saturated(self) -> bool:
        """Every decode thread stuck on one image for a while: new requests would wait behind them."""
        started = list(self.decoding.values())
        return len(started) >= self.config.decode_threads and \
            time.monotonic() - min(started) > DECODE_STALL_S

    # --- the prediction pipeline -----------------------------------------------------------------------

    async def offload(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Small inputs run inline (a thread hop costs more than the work); large ones off the event loop."""
        if size <= OFFLOAD_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    def _decode_on_thread(self, info: ImageInfo, deadline: float) -> tuple[np.ndarray, float]:
        thread = threading.get_ident()
        start = self.decoding[thread] = time.monotonic()
        try:
            return decode_probed(info, deadline), time.monotonic() - start
        finally:
            del self.decoding[thread]

    def _start_decode(self, info: ImageInfo, deadline: float) -> asyncio.Future:
        """Decode one admitted image on a decode thread. Its admission (one image, its estimated peak bytes) is held
        until that thread is done with it, also when the requester stops waiting earlier."""
        loop = asyncio.get_running_loop()
        job = self.decode_pool.submit(self._decode_on_thread, info, deadline)
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self.batcher.release, 1, info.cost_bytes))
        return asyncio.wrap_future(job)

    async def probe(self, data: bytes) -> ImageInfo:
        try:
            return await self.offload(len(data), probe_image, data, self.limits)
        except ImageDecodeError as e:
            raise decode_error(e) from None

    async def decode(self, infos: list[ImageInfo], deadline: float) -> list[tuple[np.ndarray, float] | ApiError]:
        """Admit (by count and by decode memory) and decode probed images; an image or an ApiError each, in order.
        Raises ApiError when the server cannot take them."""
        self._admit(len(infos), deadline, sum(info.cost_bytes for info in infos))
        outcomes = await asyncio.gather(*(self._start_decode(info, deadline) for info in infos),
                                        return_exceptions=True)
        decoded: list[tuple[np.ndarray, float] | ApiError] = []
        for outcome in outcomes:
            if isinstance(outcome, ImageDecodeError):
                decoded.append(decode_error(outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                self.metrics.decode_latency.observe(outcome[1])
                decoded.append(outcome)
        return decoded

    def cached(self, key: bytes, explain: bool) -> Any | None:
        """A cached result this request can use: one computed without an explanation does not answer a request
        that asks for one (it is computed again, and the explained result replaces it)."""
        if not self.cache.enabled:
            return None
        hit = self.cache.get(key)
        if hit is not None and explain and hit.explanation is None:
            hit = None
        if hit is None:
            self.metrics.cache_misses.inc()
        else:
            self.metrics.cache_hits.inc()
        return hit

    async def cached_shared(self, key: bytes, explain: bool) -> Any | None:
        """The Redis cache's answer (kept in-process too), or None; never raises, never waits beyond its deadline."""
        if self.shared is None:
            return None
        hit = await self.shared.get(key, explain)
        if hit is not None:
            self.cache.put(key, hit)
        return hit

    def check_explain(self, explain: bool) -> None:
        if explain and not self.has_vlm:
            raise ApiError(400, "explain_unavailable", "explain=1 needs a vlm stage, and this server's bundle has "
                                                       "none (see GET /v1/models)")

    async def predict(self, blobs: list[bytes | ApiError], start: float, deadline: float, detail: bool,
                      explain: bool = False, capture: bool = False) -> list[dict | ApiError]:
        """One answer or one error per image, in order. Raises ApiError only for whole-request failures.
        `capture`: offer every answered image to the hard-case capture (?capture=1)."""
        self.check_explain(explain)
        slots = min(len(blobs), self.config.max_explanations) if explain else 0
        with self.explaining(slots):
            return await self._predict(blobs, start, deadline, detail, explain, slots, capture)

    async def _predict(self, blobs: list[bytes | ApiError], start: float, deadline: float, detail: bool,
                       explain: bool, slots: int, capture: bool) -> list[dict | ApiError]:
        answers: list[dict | ApiError | None] = [None] * len(blobs)
        results: dict[int, Any] = {}  # ImageResult per answered image, for the hard-case capture
        keys: dict[int, bytes] = {}
        misses: list[int] = []
        for i, blob in enumerate(blobs):
            if isinstance(blob, ApiError):
                answers[i] = blob
                continue
            keys[i] = await self.offload(len(blob), image_key, blob)
            hit = self.cached(keys[i], explain) or await self.cached_shared(keys[i], explain)
            if hit is not None:
                results[i] = hit
                answers[i] = _answer(hit, True, detail, explain, total_s=time.monotonic() - start)
            else:
                misses.append(i)

        to_run: list[tuple[int, Any, float, int]] = []  # (index, image, decode seconds, JPEG reduction)
        items: list[WorkItem] = []
        infos: dict[int, ImageInfo] = {}
        for i in misses:  # each image's header checks fail that image only, before anything is admitted
            try:
                infos[i] = await self.probe(blobs[i])
            except ApiError as e:
                answers[i] = e
        if infos:
            decoded = await self.decode(list(infos.values()), deadline)
            for (i, info), outcome in zip(infos.items(), decoded):
                if isinstance(outcome, ApiError):
                    answers[i] = outcome
                else:
                    to_run.append((i, outcome[0], outcome[1], info.scale))
            if to_run:
                items = self.batcher.submit([image for _, image, _, _ in to_run], deadline)
        computed: dict[int, Any] = {}  # index -> ImageResult of the images computed here
        if items:
            await self._await_items(to_run, items, keys, answers, computed, start, deadline, detail)
        unasked = [] if explain else [i for i, result in computed.items() if self.explains_unasked(result)]
        if explain:
            await self._explain_answers(list(computed), keys, to_run, answers, computed, deadline, detail, slots,
                                        asked=True)
        elif unasked:
            with self.spare_explanations(len(unasked)) as spare:
                if spare:
                    await self._explain_answers(unasked, keys, to_run, answers, computed, deadline, detail, spare,
                                                asked=False)
        results.update(computed)
        for answer in answers:
            self.count_image(answer)
        if self.hardcases is not None:
            for i, result in results.items():
                self.hardcases.offer(blobs[i], result, capture)
        return answers

    def count_image(self, answer: dict | ApiError) -> None:
        if isinstance(answer, ApiError):
            self.metrics.images.labels(answer.code).inc()
        else:
            self.metrics.images.labels("cached" if answer["cached"] else "computed").inc()

    def _admit(self, count: int, deadline: float, nbytes: int) -> None:
        if count > self.batcher.queue_size:
            raise ApiError(413, "too_many_images", f"{count} images to compute exceed the queue size "
                                                   f"({self.batcher.queue_size}); send smaller batches")
        if nbytes > self.batcher.max_bytes:
            raise ApiError(413, "images_too_large", f"decoding these images takes ~{nbytes / 2**20:.0f} MiB, more than "
                                                    f"the server's {self.batcher.max_bytes / 2**20:.0f} MiB; send "
                                                    f"smaller images or fewer per request")
        try:
            self.batcher.admit(count, deadline, nbytes)
        except QueueFull as e:
            raise ApiError(503, "queue_full", f"server is overloaded: {e}", {"Retry-After": RETRY_AFTER_S}) from None
        except BatcherClosed as e:
            raise ApiError(503, "shutting_down", str(e), {"Retry-After": RETRY_AFTER_S}) from None

    async def refuse_early(self, deadline: float, length: int | None) -> None:
        """Before a body is read: refuse (503, the body unread) if one more image would be refused anyway."""
        refused = self.batcher.refusal(1, deadline)
        if refused is None:
            return
        reason, message = refused
        self.metrics.queue_dropped.labels(reason).inc()
        if reason != "shutting_down":
            await asyncio.sleep(REFUSAL_PACE_S)
        raise ApiError(503, "shutting_down" if reason == "shutting_down" else "queue_full",
                       f"server is overloaded: {message}", {"Retry-After": RETRY_AFTER_S},
                       close=length is None or length > DRAIN_BELOW_BYTES)

    def explains_unasked(self, result: Any) -> bool:
        """The bundle's explain_above rule names this result for an explanation nobody asked for."""
        return self.explain_above is not None and result.explanation is None and result.prediction > self.explain_above

    @contextlib.contextmanager
    def spare_explanations(self, wanted: int):
        """Hold as many max_explanations slots as are free, up to `wanted` (maybe none): explanations nobody asked
        for never take a slot from one that was asked for, and never fail the request."""
        count = max(0, min(wanted, self.config.max_explanations - self.explanations))
        self.explanations += count
        try:
            yield count
        finally:
            self.explanations -= count

    @contextlib.contextmanager
    def explaining(self, count: int):
        """Hold `count` of the max_explanations slots (503 beyond it) while explanations decode."""
        if count and self.explanations + count > self.config.max_explanations:
            raise ApiError(503, "explanations_busy", f"{self.explanations} explanations are being written, the "
                                                     f"server's limit is {self.config.max_explanations}; retry, or "
                                                     f"ask without explain", {"Retry-After": RETRY_AFTER_S})
        self.explanations += count
        try:
            yield
        finally:
            self.explanations -= count

    async def submit_one(self, data: bytes, deadline: float,
                         on_stage: StageListener) -> tuple[WorkItem, np.ndarray, float, int]:
        """Probe, admit, decode and queue one image whose stage decisions go to on_stage (the stream endpoint)."""
        try:
            info = await self.probe(data)
            [outcome] = await self.decode([info], deadline)
            if isinstance(outcome, ApiError):
                raise outcome
        except ApiError as e:
            self.count_image(e)
            raise
        image, decode_s = outcome
        [item] = self.batcher.submit([image], deadline, on_stage=on_stage)
        return item, image, decode_s, info.scale

    async def _explain_answers(self, indexes: list[int], keys: dict[int, bytes],
                               to_run: list[tuple[int, Any, float, int]], answers: list, computed: dict[int, Any],
                               deadline: float, detail: bool, slots: int, asked: bool) -> None:
        """The explanations of the computed answers at `indexes`, decoded on the VLM loop thread (never on the
        inference worker, so explanations never hold up scoring), `slots` at a time, within the request's deadline.
        `asked` (explain=1): a failed explanation fails its answer; else (the bundle's explain_above rule) the
        answer goes without one."""
        concurrent = asyncio.Semaphore(slots)
        images = {i: image for i, image, _, _ in to_run}
        wanted = [i for i in indexes if i in computed and computed[i].explanation is None]

        async def explain_one(i: int) -> None:
            try:
                async with concurrent, asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    explained = await _stream_explanation(self, None, keys[i], images[i], computed[i])
            except TimeoutError:
                if asked:
                    answers[i] = ApiError(504, "deadline_exceeded", "the explanation did not finish within the "
                                                                    f"{self.config.timeout_s:g} s deadline")
                return
            except ApiError as e:
                if asked:
                    answers[i] = e
                return
            answers[i]["explanation"] = explained.explanation
            if detail:
                answers[i]["tokens"] = explained.tokens

        await asyncio.gather(*(explain_one(i) for i in wanted))

    async def _await_items(self, to_run: list[tuple[int, Any, float, int]], items: list[WorkItem],
                           keys: dict[int, bytes], answers: list, computed: dict[int, Any], start: float,
                           deadline: float, detail: bool) -> None:
        try:
            _, pending = await asyncio.wait([item.future for item in items],
                                            timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            for item in items:
                self.batcher.abandon(item, "client_disconnected")
            raise
        for (i, _, decode_s, scale), item in zip(to_run, items):
            if item.future in pending:
                self.batcher.abandon(item, "deadline")
                answers[i] = ApiError(504, "deadline_exceeded",
                                      f"no answer within the {self.config.timeout_s:g} s deadline")
                continue
            outcome = computed_or_error(item)
            if isinstance(outcome, ApiError):
                answers[i] = outcome
                continue
            if not self.explains_unasked(outcome.result):  # else remembered once explained
                self.remember(keys[i], outcome.result)
            answers[i] = _answer(outcome.result, False, detail, False, total_s=time.monotonic() - start,
                                 decode_s=decode_s, queue_s=outcome.queue_wait_s, compute_s=outcome.compute_s,
                                 scale=scale)
            computed[i] = outcome.result

    def remember(self, key: bytes, result: Any) -> None:
        if not result.degraded:  # a degraded answer may improve once the failing stage recovers
            self.cache.put(key, result)
            if self.shared is not None:
                self.shared.put(key, result)


def shared_cache(engine: Any, config: ServerConfig, metrics: ServerMetrics) -> RedisCache | None:
    """The Redis cache when --redis-url is set; its keys name the bundle's content (the answer's model)."""
    if config.redis_url is None:
        return None
    from server.redis_cache import RedisCache, RedisSettings  # only when asked for: the client is not needed else

    model_id = engine.content_digest[:32]
    settings = RedisSettings(config.redis_url, config.redis_ttl_s, config.redis_timeout_ms / 1000)
    return RedisCache(settings, model_id, metrics.registry)


def computed_or_error(item: WorkItem) -> Computed | ApiError:
    """A finished work item's result, or the API error its failure maps to."""
    error = item.future.exception()
    if isinstance(error, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", str(error))
    if isinstance(error, InputError):
        return ApiError(422, "unprocessable_image", f"the model cannot take this image: {error}")
    if isinstance(error, InferenceFailed):
        log.error("request %s: inference failed on one image: %r", REQUEST_ID.get(), error.error)
        return ApiError(500, "inference_failed", f"the model failed on this image; request id {REQUEST_ID.get()}")
    if error is not None:
        raise error
    return item.future.result()


def decode_error(e: ImageDecodeError) -> ApiError:
    return ApiError(DECODE_ERROR_STATUS[e.code], e.code, str(e))


def _answer(result: Any, cached: bool, detail: bool, explain: bool, total_s: float, decode_s: float = 0.0,
            queue_s: float = 0.0, compute_s: float = 0.0, scale: int = 1) -> dict:
    """`scale`: the JPEG reduction the image was decoded at; boxes are given in the original image's pixels."""
    answer = {
        "prediction": result.prediction,
        "label": result.label,
        "stage": result.stage,
        "cached": cached,
        "degraded": result.degraded,
        "timings_ms": {"decode": round(decode_s * 1e3, 3), "queue": round(queue_s * 1e3, 3),
                       "compute": round(compute_s * 1e3, 3), "total": round(total_s * 1e3, 3)},
    }
    if explain or result.explanation is not None:  # the bundle's explain_above rule explains unasked
        answer["explanation"] = result.explanation
    if detail:
        answer["tokens"] = result.tokens
        answer["scores"] = dict(result.scores)
        if result.detector_scores:
            answer["detector_scores"] = dict(result.detector_scores)
            answer["detector_ms"] = dict(result.detector_ms)
        if result.boxes is not None:
            answer["boxes"] = [{"detector": b.detector, "label": b.label, "score": b.score,
                                "xyxy": [v * scale for v in b.xyxy]} for b in result.boxes]
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


def _deadline(service: Service, start: float, requested_s: object = None) -> float:
    timeout_s = service.config.timeout_s
    if isinstance(requested_s, (int, float)) and not isinstance(requested_s, bool) and requested_s > 0:
        timeout_s = min(timeout_s, float(requested_s))
    return start + timeout_s


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
    deadline = _deadline(service, start)
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
    deadline = _deadline(service, start)
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
            result, answer = hit, _answer(hit, True, detail, explain, total_s=time.monotonic() - start)
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
        result = await _stream_explanation(service, events, key, image, result)
    elif service.explains_unasked(result):
        with service.spare_explanations(1) as spare:
            if spare:
                result = await _stream_explanation(service, events, key, image, result)
    return result, _answer(result, False, detail, explain, total_s=time.monotonic() - start, decode_s=decode_s,
                           queue_s=computed.queue_wait_s, compute_s=computed.compute_s, scale=scale)


async def _stream_explanation(service: Service, events: EventStream | None, key: bytes, image: np.ndarray,
                              result: Any) -> Any:
    """Engine.explain_stream's text (as token events, given `events`); the result with its explanation and all of
    its tokens. Asked for after the cascade decided: the explanation opens with the result's label (the yes or no
    token), the first token event included, so it cannot contradict the answer it comes with."""
    idle_s = service.config.timeout_s
    pieces: list[str] = []
    try:
        async with Explanation(service.engine, image, result.label == "roadwork", idle_s) as explanation:
            async for output in explanation:
                if output.text:
                    pieces.append(output.text)
                    if events is not None:
                        await events.send("token", {"text": output.text})
    except TimeoutError:
        raise ApiError(504, "explanation_timeout", f"the explanation produced nothing for {idle_s:g} s") from None
    except (ApiError, ConnectionResetError):
        raise
    except Exception:
        log.exception("request %s: explanation failed", REQUEST_ID.get())
        raise ApiError(500, "explanation_failed", f"the vlm stage failed to explain this image; request id "
                                                  f"{REQUEST_ID.get()}") from None
    final = explanation.final
    if final.finish_reason == "error":
        raise ApiError(500, "explanation_failed", "the vlm stage failed while explaining this image; see the server "
                                                  "log")
    if final.finish_reason == "cancelled":  # not by us: the engine was closed under the stream
        raise ApiError(503, "shutting_down", "the vlm stage stopped before the explanation finished")
    # The VLM may have scored this image too: both requests' tokens count.
    counts = add_tokens(result.tokens, TokenCounts(prompt=final.prompt_tokens, cached=final.cached_tokens,
                                                   generated=final.generated_tokens))
    explained = dataclasses.replace(result, explanation="".join(pieces), tokens=counts)
    service.remember(key, explained)
    return explained


async def predict_batch(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    start = time.monotonic()
    _require_json(request)
    detail, explain = _wants_detail(request), _flag(request, "explain")
    deadline = _deadline(service, start)
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
    async with read_body(request, service, _deadline(service, start)) as body:
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
    server = {"max_batch": config.batch_size} | {name: getattr(config, name) for name in (
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

# A client's own X-Request-ID is kept (echoed, and in our log lines) when it is short and plain: it goes into logs
# and headers, so no control characters, spaces or quotes. Anything else gets a new id.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_of(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]


@web.middleware
async def observe(request: web.Request, handler: Callable) -> web.StreamResponse:
    """JSON errors for every failure, plus per-request metrics and a structured debug line."""
    start = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    request_id = request_id_of(request)
    REQUEST_ID.set(request_id)  # this task's context: the handler and what it awaits
    try:
        try:
            response = await handler(request)
        except ApiError as e:
            response = error_response_for(request.path)(e, request_id if e.status >= 500 else None)
        except web.HTTPException as e:
            response = error_response_for(request.path)(from_http_exception(e))
        except asyncio.CancelledError:
            status = 499  # client closed the connection before the answer
            raise
        except Exception:
            log.exception("request %s: unhandled error on %s %s", request_id, request.method, request.path)
            response = error_response_for(request.path)(ApiError(500, "internal_error", "internal server error"),
                                                        request_id)
        if not response.prepared:
            response.headers["X-Request-ID"] = request_id
        status = response.status
        return response
    finally:
        took = time.perf_counter() - start
        server_metrics = request.app[SERVICE].metrics
        server_metrics.requests.labels(route, str(status)).inc()
        server_metrics.request_latency.labels(route).observe(took)
        if request_log.isEnabledFor(logging.DEBUG):
            request_log.debug(orjson.dumps({"request_id": request_id, "method": request.method, "route": route,
                                            "status": status, "ms": round(took * 1e3, 3),
                                            "bytes_in": request.content_length, "remote": request.remote}).decode())


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free port), not yet listening: taken before the model loads, so a busy
    port fails the start at once, and connections are refused, not left waiting, until the server listens."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's own sites do
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def start_site(app: web.Application, host: str, port: int, access_log: bool = False,
                     shutdown_timeout_s: float = 30.0, sock: socket.socket | None = None
                     ) -> tuple[web.AppRunner, str, int]:
    """Start serving app on host:port (0 picks a free port), or on `sock` (bind_socket's) when given; returns the
    runner and the bound address.

    Slow clients: aiohttp's keep-alive timer runs from the moment a connection opens until a request's headers are
    complete, so keepalive_timeout_s bounds silent sockets, trickled headers and idle keep-alive alike; bodies must
    arrive within the request deadline (_body); connections are capped in all and per address (server/guard.py)."""
    service = app[SERVICE]
    config = service.config
    runner = CappedRunner(app, service.connections,
                          handler_cancellation=True,  # a client that hangs up cancels its handler
                          access_log=logging.getLogger("aiohttp.access") if access_log else None,
                          access_log_format=ACCESS_LOG_FORMAT,
                          shutdown_timeout=shutdown_timeout_s, keepalive_timeout=config.keepalive_timeout_s)
    await runner.setup()
    try:
        await (web.TCPSite(runner, host, port) if sock is None else web.SockSite(runner, sock)).start()
    except OSError:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, bound_host, bound_port


def create_app(engine: Engine, config: ServerConfig) -> web.Application:
    """One app serving one loaded Engine; warmup starts with the app and /readyz turns 200 when it ends."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[observe])
    service = Service(engine, config)
    app[SERVICE] = service
    app.router.add_post("/v1/predict", predict)
    app.router.add_post("/v1/predict/batch", predict_batch)
    app.router.add_post("/v1/predict/stream", predict_stream)
    app.router.add_post("/ImageSynapse", image_synapse)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics_endpoint)
    add_openapi_route(app)
    add_kserve_routes(app, service)

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
