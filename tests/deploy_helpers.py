"""Shared by the deploy tests: a real redis-server, Prometheus and metrics queries."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from deploy.stack import redis_ping

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))


def start_redis(port: int, directory: Path, timeout_s: float = 10.0) -> subprocess.Popen:
    process = subprocess.Popen(["redis-server", str(DEPLOY / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(directory), "--daemonize", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not redis_ping("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"redis-server on port {port} did not start")
        time.sleep(0.05)
    return process


def stop_process(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def get_json(url: str, timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def prometheus_query(base_url: str, expr: str) -> list[dict]:
    """The instant-query result vector (or scalar as one element)."""
    data = get_json(f"{base_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", data
    result = data["data"]["result"]
    return result if data["data"]["resultType"] == "vector" else [{"value": result}]


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples named `name` (with these labels) on a replica's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, number = line.rpartition(" ")
        metric_name, _, label_text = series.partition("{")
        if metric_name != name:
            continue
        if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            continue
        total += float(number)
    return total
