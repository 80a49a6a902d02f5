"""Closed-loop HTTP load for the stack's tests and benchmark: W workers, each sending its next request as soon as the
last one answered, over one keep-alive connection each. Every request's outcome is kept: a test can say "0 lost"."""
from __future__ import annotations

import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REQUEST_TIMEOUT_S = 15.0  # above the 9 s budget: a slow answer is recorded as slow, not as a client give-up


class VariedImages:
    """Real photos made unique per request (a random 8x8 block repainted, then JPEG quality 75 like the validators):
    each request computes through the cascade instead of hitting a cache, and takes the paths real images take."""

    def __init__(self, paths: list[Path], seed: int = 0) -> None:
        assert paths, "at least one image"
        self.pixels = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()

    def __call__(self) -> bytes:
        with self.lock:
            pixels = self.pixels[self.rng.integers(len(self.pixels))].copy()
            y, x = self.rng.integers(0, pixels.shape[0] - 8), self.rng.integers(0, pixels.shape[1] - 8)
            pixels[y:y + 8, x:x + 8] = self.rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
        return buffer.getvalue()


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)   # HTTP status -> count; "error" for no answer at all
    errors: list[str] = field(default_factory=list)       # the first few failures, described
    latencies_s: list[float] = field(default_factory=list)  # of 200 answers
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses[200]

    @property
    def failed(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")


class ClosedLoop:
    def __init__(self, host: str, port: int, images, workers: int = 8, path: str = "/v1/predict",
                 max_errors_kept: int = 20) -> None:
        self.host, self.port, self.path = host, port, path
        self.images = images
        self.workers = workers
        self.max_errors_kept = max_errors_kept
        self.result = LoadResult()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._worker, name=f"load-{i}", daemon=True) for i in range(workers)]
        self.started = 0.0

    def start(self) -> ClosedLoop:
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> LoadResult:
        """Stop sending; requests in flight finish and count."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
        self.result.elapsed_s = time.perf_counter() - self.started
        return self.result

    @property
    def answered(self) -> int:
        with self.lock:
            return sum(self.result.statuses.values())

    def _record(self, status: int | str, took_s: float, error: str | None = None) -> None:
        with self.lock:
            self.result.statuses[status] += 1
            if status == 200:
                self.result.latencies_s.append(took_s)
            elif error is not None and len(self.result.errors) < self.max_errors_kept:
                self.result.errors.append(error)

    def _worker(self) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self.stopping.is_set():
            body = self.images()
            if connection is None:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
            start = time.perf_counter()
            try:
                connection.request("POST", self.path, body=body, headers={"Content-Type": "image/jpeg"})
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as e:
                self._record("error", time.perf_counter() - start, f"{type(e).__name__}: {e}")
                connection.close()
                connection = None
                continue
            took = time.perf_counter() - start
            self._record(response.status, took,
                         None if response.status == 200 else f"{response.status}: {payload[:200]!r}")
            if response.will_close:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()


def post_image(url: str, body: bytes, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int, dict]:
    """One JPEG POSTed to `url`: the status and the JSON answer (an error's too)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
