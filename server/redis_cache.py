"""The shared result cache: Redis behind the in-process LRU, one for every replica of a deployment.

Redis is never on the critical path. Every call has a deadline of a few ms; a failed or slow call answers "miss"
(reads) or is dropped (writes), counts in roadwork_redis_errors and makes the cache skip Redis for a backoff that
doubles per consecutive failure (the client reconnects on the first call after it). Writes run in the background:
a request never waits for one.

Key: roadwork:v1:<model>:<image hash>:<p|e>. <model> is the bundle's content digest plus the dtype (the answer's
identity); `e` holds results that carry an explanation, `p` every result (an explained one answers a plain request
too, as in the in-process cache). `detail` is not in the key: the stored result holds everything detail shows."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runtime.cascade.results import Box, ImageResult

log = logging.getLogger(__name__)

KEY_VERSION = "v1"  # bump when the stored value's layout changes
REDIS_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05)
MAX_PENDING_WRITES = 256  # background SETs in flight; beyond this new writes are dropped (counted)


@dataclass(frozen=True)
class RedisSettings:
    url: str
    ttl_s: float = 3600.0
    timeout_s: float = 0.005       # deadline of every call
    backoff_s: float = 0.05        # first pause after a failure; doubles per consecutive failure
    max_backoff_s: float = 5.0
    max_connections: int = 32

    def __post_init__(self) -> None:
        assert self.ttl_s > 0 and self.timeout_s > 0 and 0 < self.backoff_s <= self.max_backoff_s
        assert self.max_connections > 0


class RedisMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.hits = Counter("roadwork_redis_hits", "Shared (Redis) cache hits", registry=r)
        self.misses = Counter("roadwork_redis_misses", "Shared (Redis) cache misses", registry=r)
        self.errors = Counter("roadwork_redis_errors", "Redis calls that failed, by operation and reason "
                              "(timeout, connection, other); each one answered from the model instead",
                              ["op", "reason"], registry=r)
        self.skipped = Counter("roadwork_redis_skipped", "Redis calls not made because the cache is backing off "
                               "after a failure", ["op"], registry=r)
        self.latency = Histogram("roadwork_redis_duration_seconds", "Redis call time, by operation", ["op"],
                                 buckets=REDIS_BUCKETS_S, registry=r)
        self.up = Gauge("roadwork_redis_up", "1 while the last Redis call succeeded, 0 while backing off",
                        registry=r)


def result_bytes(result: ImageResult) -> bytes:
    return orjson.dumps(dataclasses.asdict(result))


def result_from_bytes(data: bytes) -> ImageResult:
    fields = orjson.loads(data)
    if fields.get("boxes") is not None:
        fields["boxes"] = [Box(**{**b, "xyxy": tuple(b["xyxy"])}) for b in fields["boxes"]]
    return ImageResult(**fields)


class RedisCache:
    def __init__(self, settings: RedisSettings, model_id: str, registry: CollectorRegistry,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.prefix = f"roadwork:{KEY_VERSION}:{model_id}:"
        self.metrics = RedisMetrics(registry)
        self.metrics.up.set(1)
        self.clock = clock
        self.client = Redis.from_url(settings.url, socket_timeout=settings.timeout_s,
                                     socket_connect_timeout=settings.timeout_s, retry=Retry(NoBackoff(), 0),
                                     max_connections=settings.max_connections)
        self.failures = 0          # consecutive
        self.retry_at = 0.0        # clock() before which calls are skipped
        self.pending: set[asyncio.Task] = set()

    def key(self, image_key: bytes, explained: bool) -> str:
        return self.prefix + image_key.hex() + (":e" if explained else ":p")

    async def get(self, image_key: bytes, explain: bool) -> ImageResult | None:
        """The shared answer for this image, or None (a miss, or Redis failed, slow or backing off)."""
        data = await self._call("get", self.client.get, self.key(image_key, explain))
        if data is None:
            self.metrics.misses.inc()
            return None
        try:
            result = result_from_bytes(data)
        except (orjson.JSONDecodeError, TypeError) as e:  # another version's layout under our key: treat as a miss
            log.warning("unreadable redis cache value (%s); ignoring it", e)
            self.metrics.errors.labels("get", "decode").inc()
            self.metrics.misses.inc()
            return None
        self.metrics.hits.inc()
        return result

    def put(self, image_key: bytes, result: ImageResult) -> None:
        """Store in the background; an explained result also answers plain requests."""
        if len(self.pending) >= MAX_PENDING_WRITES:
            self.metrics.skipped.labels("set").inc()
            return
        value = result_bytes(result)
        keys = [self.key(image_key, False)] + ([self.key(image_key, True)] if result.explanation is not None else [])
        task = asyncio.get_running_loop().create_task(self._set(keys, value))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _set(self, keys: list[str], value: bytes) -> None:
        ttl_ms = int(self.settings.ttl_s * 1000)
        for key in keys:
            await self._call("set", self.client.set, key, value, px=ttl_ms)

    async def _call(self, op: str, fn: Callable, *args, **kwargs):
        """fn(*args) within the deadline; None on any failure (counted, and the backoff starts)."""
        if self.clock() < self.retry_at:
            self.metrics.skipped.labels(op).inc()
            return None
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                value = await fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever Redis does, the request goes on without it
            self._failed(op, e)
            return None
        self.metrics.latency.labels(op).observe(time.perf_counter() - start)
        if self.failures:
            log.info("redis is answering again after %d failed calls", self.failures)
            self.failures = 0
            self.metrics.up.set(1)
        return value

    def _failed(self, op: str, error: BaseException) -> None:
        if isinstance(error, (TimeoutError, RedisTimeoutError)):
            reason = "timeout"
        elif isinstance(error, (RedisConnectionError, OSError)):
            reason = "connection"
        else:
            reason = "other"
        self.metrics.errors.labels(op, reason).inc()
        self.failures += 1
        pause = min(self.settings.max_backoff_s, self.settings.backoff_s * 2 ** (self.failures - 1))
        self.retry_at = self.clock() + pause
        self.metrics.up.set(0)
        if self.failures == 1 or reason == "other":  # once per outage, not once per call
            log.warning("redis %s failed (%s%s); answering without it for %.2f s", op, reason,
                        f": {error}" if str(error) else "", pause)

    async def close(self) -> None:
        """Let background writes finish (each is bounded by the call deadline), then drop the connections."""
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=1.0)
        await self.client.aclose()
