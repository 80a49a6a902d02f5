"""The Service behind every route: admission, the cache -> decode -> batch pipeline, explanations, deadlines, the
shared cache, readiness and warmup."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from aiohttp import web

from runtime.image_decode import DecodeLimits, ImageDecodeError, ImageInfo, decode_image, decode_probed, probe_image
from server.answers import answer_json, computed_or_error, decode_error, warmup_jpeg
from server.batcher import Batcher, BatcherClosed, QueueFull, StageListener, WorkItem
from server.cache import ResultCache, image_key
from server.config import ServerConfig
from server.errors import RETRY_AFTER_S, ApiError
from server.guard import ByteBudget, ConnectionCap
from server.hardcases import hard_case_capture
from server.metrics import ServerMetrics
from server.stream import EventStream, explain_result

if TYPE_CHECKING:  # the engine pulls in torch and the models; --help stays fast without them
    from runtime.cascade.engine import Engine
    from server.redis_cache import RedisCache

log = logging.getLogger(__name__)

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


class Service:
    """Everything one app instance owns: engine, batcher, cache, decode threads, metrics, readiness."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics()
        self.cache = ResultCache(config.cache_entries, config.cache_bytes, config.cache_ttl_s)
        # Batches of the size the engine was built for (its graph buckets), whatever the config says.
        self.batcher = Batcher(engine, engine.max_batch, config.max_delay_ms / 1000, config.queue_size,
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
        self.metrics.report_precision(None if engine.precision.choice is None else engine.precision.choice.describe())
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
        sample = warmup_jpeg()
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

    def deadline(self, start: float, requested_s: object = None) -> float:
        """start + --timeout-s, shortened by a client's own positive timeout (the synapse's, KServe's)."""
        timeout_s = self.config.timeout_s
        if isinstance(requested_s, (int, float)) and not isinstance(requested_s, bool) and requested_s > 0:
            timeout_s = min(timeout_s, float(requested_s))
        return start + timeout_s

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
                answers[i] = answer_json(hit, True, detail, explain, total_s=time.monotonic() - start)
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
                    explained = await self.explain(keys[i], images[i], computed[i])
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

    async def explain(self, key: bytes, image: np.ndarray, result: Any, events: EventStream | None = None) -> Any:
        """The result with its explanation (streamed as token events, given `events`), remembered in the caches."""
        explained = await explain_result(self.engine, image, result, self.config.timeout_s, events)
        self.remember(key, explained)
        return explained

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
            answers[i] = answer_json(outcome.result, False, detail, False, total_s=time.monotonic() - start,
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
    from server.redis_cache import (  # only when asked for: the client is not needed else
        RedisCache,
        RedisSettings,
    )

    model_id = engine.content_digest[:32]
    settings = RedisSettings(config.redis_url, config.redis_ttl_s, config.redis_timeout_ms / 1000)
    return RedisCache(settings, model_id, metrics.registry)


SERVICE = web.AppKey("service", Service)
