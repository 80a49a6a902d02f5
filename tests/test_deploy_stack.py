"""The stack for real: Redis, 3 server replicas (the bundled 3-stage model), nginx and Prometheus, started by
deploy.stack as `python -m deploy up` starts them, on test ports. Replicas are killed, restarted and starved of Redis
under closed-loop load through nginx; no request may be lost."""
from __future__ import annotations

import json
import math
import signal
import time
import urllib.error
import urllib.request

import pytest

from deploy.load import ClosedLoop, VariedImages, post_image
from deploy.stack import Stack, StackSpec, free_ports, missing_programs
from fixtures.deploy import DEPLOY, SAMPLES, metric, prometheus_query

REPLICAS = 3
pytestmark = [pytest.mark.slow]


def spec_for(run_dir) -> StackSpec:
    ports = free_ports(REPLICAS + 4)
    return StackSpec(run_dir=run_dir, replicas=REPLICAS, public_port=ports[0], replica_port=ports[1],
                     redis_port=ports[REPLICAS + 1], prometheus_port=ports[REPLICAS + 2], scrape_interval="1s",
                     server_args=("--max-batch", "4", "--redis-timeout-ms", "50"), torch_threads=1,
                     env={"TRITON_INTERPRET": "0"})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    spec = spec_for(tmp_path_factory.mktemp("stack"))
    missing = missing_programs(spec)
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (.ci/deploy.sh installs them)")
    with Stack(spec) as running:
        yield running


@pytest.fixture(scope="module")
def images():
    return VariedImages(SAMPLES, seed=15)


def load(stack: Stack, images, workers: int = 6) -> ClosedLoop:
    return ClosedLoop(stack.spec.host, stack.spec.public_port, images, workers=workers).start()


def wait_answered(loop: ClosedLoop, count: int, timeout_s: float = 60.0) -> None:
    """Until the load has `count` more answers: progress measured in requests, not wall time, on a busy machine."""
    target = loop.answered + count
    deadline = time.monotonic() + timeout_s
    while loop.answered < target:
        assert time.monotonic() < deadline, f"load stalled at {loop.answered} answers"
        time.sleep(0.05)


def wait_served_by(stack: Stack, i: int, timeout_s: float = 60.0) -> None:
    """Until nginx routes requests to replica i again: a restarted replica stays marked failed by the passive health
    check for fail_timeout after its last failure, and a rolling restart must not stop the next one before."""
    deadline = time.monotonic() + timeout_s
    while metric(stack.replica_url(i), "roadwork_images_total") == 0:
        assert time.monotonic() < deadline, f"nginx sent replica {i} nothing within {timeout_s:g} s of its restart"
        time.sleep(0.1)


def replicas_total(stack: Stack, name: str, labels: dict[str, str] | None = None) -> float:
    return sum(metric(stack.replica_url(i), name, labels) for i in range(REPLICAS))


def assert_nothing_lost(result) -> None:
    assert result.failed == 0, f"{result.failed} requests lost: {dict(result.statuses)}; first: {result.errors[:5]}"
    assert result.ok > 0


def test_prometheus_scrapes_every_replica(stack):
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/targets", timeout=5) as response:
            targets = json.loads(response.read())["data"]["activeTargets"]
        health = {t["labels"]["instance"]: t["health"] for t in targets}
        if len(health) == REPLICAS and set(health.values()) == {"up"}:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert set(health) == {stack.spec.replica_address(i) for i in range(REPLICAS)}


def test_public_listener_hides_metrics_and_enforces_the_body_limit(stack):
    for path in ("/metrics", "/v1/predict"):
        request = urllib.request.Request(stack.public_url + path, method="GET")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=5)
        assert error.value.code == (404 if path == "/metrics" else 405)
    status, body = post_image(f"{stack.public_url}/v1/predict", b"\xff" * (33 * 2**20))
    assert status == 413 and body["error"]["code"] == "body_too_large"


def test_same_image_through_two_replicas_is_a_redis_hit(stack, images):
    body = images()
    hits, computed = replicas_total(stack, "roadwork_redis_hits_total"), replicas_total(
        stack, "roadwork_images_total", {"outcome": "computed"})
    first = post_image(f"{stack.public_url}/v1/predict", body)
    second = post_image(f"{stack.public_url}/v1/predict", body)
    assert first[0] == second[0] == 200
    assert not first[1]["cached"] and second[1]["cached"]
    assert second[1]["prediction"] == first[1]["prediction"]
    # One replica computed it; another (nginx's round robin moves on) found it in Redis, not in its own memory.
    assert replicas_total(stack, "roadwork_images_total", {"outcome": "computed"}) == computed + 1
    assert replicas_total(stack, "roadwork_redis_hits_total") == hits + 1


def test_kill_9_of_a_replica_under_load_loses_no_request(stack, images):
    loop = load(stack, images)
    try:
        wait_answered(loop, 30)
        stack.replicas[1].process.send_signal(signal.SIGKILL)
        stack.replicas[1].process.wait(10)
        wait_answered(loop, 60)
        stack.start_replica(1)
        wait_answered(loop, 30)
    finally:
        result = loop.stop()
    assert_nothing_lost(result)


def test_rolling_sigterm_restart_under_load_loses_no_request(stack, images):
    loop = load(stack, images)
    try:
        wait_answered(loop, 20)
        for i in range(REPLICAS):
            assert stack.replicas[i].stop(signal.SIGTERM, timeout_s=40) == 0  # drained and exited cleanly
            wait_answered(loop, 10)
            stack.start_replica(i)
            wait_served_by(stack, i)
            wait_answered(loop, 15)
    finally:
        result = loop.stop()
    assert_nothing_lost(result)


def test_redis_killed_mid_load_loses_nothing_counts_errors_and_hits_resume(stack, images):
    errors = replicas_total(stack, "roadwork_redis_errors_total")
    loop = load(stack, images)
    try:
        wait_answered(loop, 20)
        stack.redis.process.send_signal(signal.SIGKILL)
        stack.redis.process.wait(10)
        wait_answered(loop, 40)
        assert replicas_total(stack, "roadwork_redis_errors_total") > errors
        stack.start_redis()
        wait_answered(loop, 20)
    finally:
        result = loop.stop()
    assert_nothing_lost(result)
    # The backoff is at most 5 s: within 15 s an image computed by one replica is a Redis hit on the next.
    deadline = time.monotonic() + 15
    while True:
        hits = replicas_total(stack, "roadwork_redis_hits_total")
        body = images()
        first = post_image(f"{stack.public_url}/v1/predict", body)
        second = post_image(f"{stack.public_url}/v1/predict", body)
        assert first[0] == second[0] == 200
        if replicas_total(stack, "roadwork_redis_hits_total") > hits:
            break
        assert time.monotonic() < deadline, "no Redis hit 15 s after Redis came back"
        time.sleep(0.5)
    assert all(metric(stack.replica_url(i), "roadwork_redis_up") in (0.0, 1.0) for i in range(REPLICAS))


def test_every_dashboard_panel_query_returns_data(stack, images):
    """Each PromQL of the Grafana dashboard, run against this Prometheus after it scraped live replicas under load
    (with $__rate_interval as 2m: the window spans the earlier tests' Redis outage), returns at least one series
    with a number."""
    loop = load(stack, images, workers=4)
    try:
        wait_answered(loop, 40)
    finally:
        assert_nothing_lost(loop.stop())
    time.sleep(3)  # a few more scrapes
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "roadwork.json").read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "2m")
            result = prometheus_query(stack.prometheus_url, expr)
            if not any(math.isfinite(float(series["value"][1])) for series in result):
                empty.append(f"{panel['title']}: {expr} -> {result}")
    assert not empty, "\n".join(empty)
