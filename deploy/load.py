"""The closed-loop HTTP load generator (the stack's tests, bench.stack and bench.load): W workers, each sending its
next request as soon as the last one answered, over one keep-alive connection each. Every request's outcome is
kept: a test can say "0 lost"."""
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

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def record(self, status: int | str, took_s: float, error: str | None = None, max_errors_kept: int = 20) -> None:
        self.statuses[status] += 1
        if status == 200:
            self.latencies_s.append(took_s)
        elif error is not None and len(self.errors) < max_errors_kept:
            self.errors.append(error)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")


class ClosedLoop:
    """`bodies()`: the next request body, called from the workers. `limit`: most requests in all (None: until
    stop()); `content_type`: the bodies' (raw JPEG, or the JSON validators send). `judge(status, payload)`: the
    outcome recorded for an answer, 200 only for a good one (default: its HTTP status). No answer within
    `timeout_s` is "timeout", none at all "error"."""

    def __init__(self, host: str, port: int, bodies, workers: int = 8, path: str = "/v1/predict",
                 max_errors_kept: int = 20, limit: int | None = None, content_type: str = "image/jpeg",
                 timeout_s: float = REQUEST_TIMEOUT_S, judge=lambda status, payload: status) -> None:
        self.host, self.port, self.path = host, port, path
        self.bodies = bodies
        self.workers = workers
        self.max_errors_kept = max_errors_kept
        self.limit, self.content_type, self.timeout_s, self.judge = limit, content_type, timeout_s, judge
        self.claimed = 0  # requests workers have started (<= limit)
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

    def wait(self, timeout_s: float) -> None:
        """Until the workers have sent `limit` requests and had them answered, or `timeout_s` passed."""
        for thread in self.threads:
            thread.join(max(0.0, self.started + timeout_s - time.perf_counter()))

    def stop(self) -> LoadResult:
        """Stop sending; requests in flight finish and count."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(self.timeout_s + 5)
        self.result.elapsed_s = time.perf_counter() - self.started
        return self.result

    @property
    def answered(self) -> int:
        with self.lock:
            return sum(self.result.statuses.values())

    def _record(self, status: int | str, took_s: float, error: str | None = None) -> None:
        with self.lock:
            self.result.record(status, took_s, error, self.max_errors_kept)

    def _claim(self) -> bool:
        with self.lock:
            if self.limit is not None and self.claimed >= self.limit:
                return False
            self.claimed += 1
            return True

    def _worker(self) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self.stopping.is_set() and self._claim():
            body = self.bodies()
            if connection is None:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            start = time.perf_counter()
            try:
                connection.request("POST", self.path, body=body, headers={"Content-Type": self.content_type})
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as e:
                self._record("timeout" if isinstance(e, TimeoutError) else "error", time.perf_counter() - start,
                             f"{type(e).__name__}: {e}")
                connection.close()
                connection = None
                continue
            took = time.perf_counter() - start
            outcome = self.judge(response.status, payload)
            self._record(outcome, took, None if outcome == 200 else f"{outcome}: {payload[:200]!r}")
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
