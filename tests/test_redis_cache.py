"""The shared result cache against a real redis-server: round trip, keys, TTL, and Redis failing, slow or back."""
from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess

import pytest
from prometheus_client import CollectorRegistry

from runtime.cascade.bundle import load_bundle
from runtime.cascade.precision import with_quantize
from runtime.cascade.bundle_digest import bundle_digest
from runtime.cascade.results import Box, ImageResult
from server.config import parse_config
from deploy.stack import free_ports
from fixtures.deploy import REPO, start_redis, stop_process

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed "
                                "(.ci/deploy.sh installs it)")
redis_cache = pytest.importorskip("server.redis_cache")

EXPLAINED = ImageResult(prediction=0.91, label="roadwork", stage="vlm", scores={"classifier": 0.6, "vlm": 0.91},
                        detector_scores={"detr": 0.7}, boxes=[Box("detr", "cone", 0.8, (1.0, 2.0, 30.0, 40.0))],
                        tokens={"prompt": 90, "cached": 64, "generated": 12}, explanation="cones on the lane")
PLAIN = ImageResult(prediction=0.1, label="none", stage="classifier", scores={"classifier": 0.1})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def redis_server(tmp_path):
    [port] = free_ports(1)
    process = start_redis(port, tmp_path)
    yield port, process
    process.send_signal(signal.SIGCONT)
    stop_process(process)


def make_cache(port: int, clock=None, timeout_s: float = 0.05) -> tuple[object, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = redis_cache.RedisSettings(f"redis://127.0.0.1:{port}/0", ttl_s=60.0, timeout_s=timeout_s)
    return redis_cache.RedisCache(settings, "model-a", registry, **({"clock": clock} if clock else {})), registry


def test_results_round_trip_with_ttl_and_explained_results_answer_plain_requests(redis_server):
    async def run():
        cache, registry = make_cache(redis_server[0])
        image = bytes(range(16))
        assert await cache.get(image, explain=False) is None
        cache.put(image, EXPLAINED)
        await asyncio.wait(set(cache.pending))
        assert await cache.get(image, explain=False) == EXPLAINED
        assert await cache.get(image, explain=True) == EXPLAINED
        other = bytes(16)
        cache.put(other, PLAIN)
        await asyncio.wait(set(cache.pending))
        assert await cache.get(other, explain=False) == PLAIN
        assert await cache.get(other, explain=True) is None  # a plain answer never answers ?explain=1
        ttl_ms = await cache.client.pttl(cache.key(image, False))
        keys = sorted(k.decode() for k in await cache.client.keys("*"))
        await cache.close()
        return registry, ttl_ms, keys

    registry, ttl_ms, keys = asyncio.run(run())
    assert 50_000 < ttl_ms <= 60_000
    assert keys == [f"roadwork:v1:model-a:{bytes(16).hex()}:p", f"roadwork:v1:model-a:{bytes(range(16)).hex()}:e",
                    f"roadwork:v1:model-a:{bytes(range(16)).hex()}:p"]
    assert value(registry, "roadwork_redis_hits_total") == 3
    assert value(registry, "roadwork_redis_misses_total") == 2
    assert value(registry, "roadwork_redis_errors_total", op="get", reason="connection") == 0


def test_redis_down_is_a_fast_counted_miss_then_backs_off_and_recovers(tmp_path):
    [port] = free_ports(1)
    clock = Clock()

    async def run():
        cache, registry = make_cache(port, clock)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await cache.get(b"k" * 16, explain=False) is None   # nothing listens: connection refused
        took = loop.time() - start
        assert value(registry, "roadwork_redis_errors_total", op="get", reason="connection") == 1
        assert value(registry, "roadwork_redis_up") == 0
        assert await cache.get(b"k" * 16, explain=False) is None   # inside the backoff: not even tried
        assert value(registry, "roadwork_redis_skipped_total", op="get") == 1
        clock.now += 0.06                                          # past the first 50 ms backoff: tried, fails
        assert await cache.get(b"k" * 16, explain=False) is None
        assert value(registry, "roadwork_redis_errors_total", op="get", reason="connection") == 2
        assert cache.retry_at - clock.now == pytest.approx(0.1)    # doubled
        process = start_redis(port, tmp_path)
        try:
            clock.now += 0.2
            cache.put(b"k" * 16, PLAIN)
            await asyncio.wait(set(cache.pending))
            assert await cache.get(b"k" * 16, explain=False) == PLAIN
            assert value(registry, "roadwork_redis_up") == 1 and cache.failures == 0
            await cache.close()
        finally:
            stop_process(process)
        return took

    assert asyncio.run(run()) < 0.5


def test_slow_redis_times_out_within_the_deadline(redis_server):
    """A Redis that stops answering (SIGSTOP) costs one call deadline, counted as a timeout; after SIGCONT the next
    call past the backoff succeeds."""
    port, process = redis_server
    clock = Clock()

    async def run():
        cache, registry = make_cache(port, clock, timeout_s=0.02)
        assert await cache.get(b"s" * 16, explain=False) is None  # connects while Redis still answers
        process.send_signal(signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await cache.get(b"s" * 16, explain=False) is None
        took = loop.time() - start
        timeouts = value(registry, "roadwork_redis_errors_total", op="get", reason="timeout")
        process.send_signal(signal.SIGCONT)
        clock.now += 1.0
        assert await cache.get(b"s" * 16, explain=False) is None
        misses = value(registry, "roadwork_redis_misses_total")
        await cache.close()
        return took, timeouts, misses, cache.failures

    took, timeouts, misses, failures = asyncio.run(run())
    assert took < 0.2 and timeouts == 1
    assert failures == 0 and misses == 3


def test_bundle_digest_follows_content_not_location(tmp_path):
    source = REPO / "bundles" / "default"
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    digest = bundle_digest(load_bundle(source))
    assert bundle_digest(load_bundle(copy)) == digest
    assert bundle_digest(with_quantize(load_bundle(copy), "int8")) != digest
    config = copy / "classifier" / "config.json"
    config.write_text(config.read_text() + " ")
    assert bundle_digest(load_bundle(copy)) != digest


def test_redis_options_are_validated():
    config = parse_config(["--redis-url", "redis://10.0.0.5:6379/1", "--redis-ttl-s", "60"], environ={})
    assert config.redis_url == "redis://10.0.0.5:6379/1" and config.redis_ttl_s == 60
    assert parse_config([], environ={"ROADWORK_REDIS_URL": "unix:///run/redis.sock"}).redis_url.startswith("unix")
    done = subprocess.run(["python", "-m", "server", "--redis-url", "http://x"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "--redis-url must start with redis://" in done.stderr


def test_stored_value_is_plain_json():
    assert redis_cache.result_from_bytes(redis_cache.result_bytes(EXPLAINED)) == EXPLAINED
    assert redis_cache.result_from_bytes(redis_cache.result_bytes(PLAIN)) == PLAIN
