"""Hard-case capture: which answered images to keep for relabelling, how many, and writing them off the caller's
path.

offer() runs on the request path and costs a few comparisons, random draws and deque operations: it picks the
rules an answer matches, samples, checks the caps and puts the image on a bounded queue (never blocks; a full
queue drops). A writer thread owns the HardCaseStore: it hashes, writes crash-safely and compacts labels.json
when idle. Everything that could not be kept is counted by reason.

Rules, in the order their sampling draws are tried (the first success captures):
  requested  the request asked for it (?capture=1)
  degraded   a later stage failed or its breaker was open; an earlier stage's answer stands
  vlm        the VLM stage decided
  disagree   the stages that scored the image fall on different sides of 0.5
  band       the final P is within `band` of 0.5 (the subnet's threshold)"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
import tomllib
from collections import Counter, deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from imagesets.hardcase_store import HardCaseStore

if TYPE_CHECKING:
    from runtime.cascade.engine import Engine

log = logging.getLogger(__name__)

RULES = ("requested", "degraded", "vlm", "disagree", "band")
DEFAULT_RATES = {"requested": 1.0, "degraded": 0.2, "vlm": 0.5, "disagree": 1.0, "band": 0.5}
WINDOWS = (("minute", 60.0), ("hour", 3600.0), ("day", 86400.0))


@dataclass(frozen=True)
class CaptureConfig:
    band: float = 0.1                    # |P - 0.5| <= band matches "band"
    rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    per_minute: int = 60                 # captures in any 60 s / 3600 s / 86400 s; 0: no limit
    per_hour: int = 1000
    per_day: int = 10000
    max_disk_mb: float = 2048.0          # data/ + index.jsonl; beyond it nothing more is written
    queue_size: int = 256                # images waiting for the writer
    compact_every_s: float = 5.0         # labels.json is rewritten at most this often, and this late

    def __post_init__(self) -> None:
        if not 0.0 <= self.band <= 0.5:
            raise ValueError(f"band must be in [0, 0.5], got {self.band}")
        unknown = set(self.rates) - set(RULES)
        if unknown:
            raise ValueError(f"rates: unknown rule(s) {sorted(unknown)}; rules are {', '.join(RULES)}")
        for rule, rate in self.rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"rates.{rule} must be in [0, 1], got {rate}")
        for name in ("per_minute", "per_hour", "per_day", "queue_size"):
            if getattr(self, name) < 0 or (name == "queue_size" and self.queue_size == 0):
                raise ValueError(f"{name} must be {'> 0' if name == 'queue_size' else '>= 0'}, got "
                                 f"{getattr(self, name)}")
        if self.max_disk_mb <= 0 or self.compact_every_s <= 0:
            raise ValueError("max_disk_mb and compact_every_s must be > 0")

    @classmethod
    def from_toml(cls, path: str | Path) -> CaptureConfig:
        """Keys as the fields; `[rates]` overrides per rule (unnamed rules keep their defaults)."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
        rates = {**DEFAULT_RATES, **raw.pop("rates", {})}
        try:
            return cls(rates=rates, **raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @property
    def max_disk_bytes(self) -> int:
        return int(self.max_disk_mb * 2**20)


def matched_rules(result: Any, requested: bool, band: float, vlm_stage: str | None) -> list[str]:
    """The rules an ImageResult matches, in RULES order."""
    sides = {p > 0.5 for p in result.scores.values()}
    matched = {"requested": requested, "degraded": result.degraded,
               "vlm": vlm_stage is not None and result.stage == vlm_stage,
               "disagree": len(sides) > 1, "band": abs(result.prediction - 0.5) <= band}
    return [rule for rule in RULES if matched[rule]]


class RateCaps:
    """Captures in the last minute, hour and day, each a deque of times pruned from the left."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = limits
        self.times = {name: deque() for name, _ in WINDOWS}

    def check(self, now: float) -> str | None:
        """The window whose cap is full, or None."""
        for name, span in WINDOWS:
            times, limit = self.times[name], self.limits[name]
            while times and times[0] <= now - span:
                times.popleft()
            if limit and len(times) >= limit:
                return f"rate_{name}"
        return None

    def take(self, now: float) -> None:
        for times in self.times.values():
            times.append(now)

    def refund(self) -> None:
        """Give back the newest slot (its image turned out to be a duplicate)."""
        for times in self.times.values():
            if times:
                times.pop()


@dataclass
class Offer:
    data: bytes
    result: Any
    rules: list[str]
    captured_by: str
    captured_at: float
    source: str


class HardCaseCapture:
    """Opt-in capture into one directory. `on_matched(rule)`, `on_captured(rule)` and `on_dropped(reason)` feed
    metrics; offer() may be called from any thread."""

    def __init__(self, root: str | Path, config: CaptureConfig, model_digest: Callable[[], str],
                 vlm_stage: str | None, on_matched: Callable[[str], None] = lambda rule: None,
                 on_captured: Callable[[str], None] = lambda rule: None,
                 on_dropped: Callable[[str], None] = lambda reason: None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.config = config
        self.model_digest = model_digest
        self.vlm_stage = vlm_stage
        self.on_matched, self.on_captured, self.on_dropped = on_matched, on_captured, on_dropped
        self.rng = rng or random.Random()
        self.clock = clock
        self.caps = RateCaps({"minute": config.per_minute, "hour": config.per_hour, "day": config.per_day})
        self.lock = threading.Lock()
        self.queue: queue.Queue[Offer | None] = queue.Queue(config.queue_size)
        self.matched: Counter[str] = Counter()
        self.captured: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.disk_bytes = 0
        self.store: HardCaseStore | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the store (this takes its lock and recovers from a crash) and start the writer thread."""
        assert self.thread is None
        self.store = HardCaseStore(self.root)
        self.disk_bytes = self.store.bytes
        self.thread = threading.Thread(target=self._write_loop, name="hardcases", daemon=True)
        self.thread.start()
        log.info("capturing hard cases into %s (%d already there)", self.root, len(self.store.samples))

    def offer(self, data: bytes, result: Any, requested: bool = False, source: str = "server") -> str | None:
        """Consider one answered image; returns the rule that captured it (queued for writing), else None. Never
        raises: a capture bug must not fail the request that offered the image."""
        try:
            return self._offer(data, result, requested, source)
        except Exception:
            log.exception("hard-case capture failed on an offered image")
            with self.lock:
                return self._drop("capture_error")

    def _offer(self, data: bytes, result: Any, requested: bool, source: str) -> str | None:
        rules = matched_rules(result, requested, self.config.band, self.vlm_stage)
        if not rules:
            return None
        with self.lock:
            for rule in rules:
                self.matched[rule] += 1
                self.on_matched(rule)
            captured_by = next((r for r in rules if self.rng.random() < self.config.rates.get(r, 0.0)), None)
            if captured_by is None:
                return None
            if self.disk_bytes >= self.config.max_disk_bytes:
                return self._drop("disk_full")
            now = self.clock()
            full = self.caps.check(now)
            if full is not None:
                return self._drop(full)
            try:
                self.queue.put_nowait(Offer(data, result, rules, captured_by, now, source))
            except queue.Full:
                return self._drop("queue_full")
            self.caps.take(now)
        return captured_by

    def _drop(self, reason: str) -> None:  # called under self.lock
        self.dropped[reason] += 1
        self.on_dropped(reason)
        return None

    def _write_loop(self) -> None:
        store = self.store
        assert store is not None
        last_compact = time.monotonic()
        digest: str | None = None
        while True:
            try:
                offer = self.queue.get(timeout=self.config.compact_every_s)
            except queue.Empty:
                offer = False
            if offer is None:
                break
            if offer:
                if digest is None:
                    digest = self.model_digest()  # hashing the model files: here, never on the request path
                self._write(store, offer, digest)
            # Each compaction rewrites labels.json whole: at most one per compact_every_s, however busy.
            if store.dirty and time.monotonic() - last_compact >= self.config.compact_every_s:
                self._compact(store)
                last_compact = time.monotonic()
        if store.dirty:
            self._compact(store)

    def _write(self, store: HardCaseStore, offer: Offer, digest: str) -> None:
        r = offer.result
        boxes = None if r.boxes is None else [
            {"detector": b.detector, "label": b.label, "score": b.score, "xyxy": list(b.xyxy)} for b in r.boxes]
        try:
            sample = store.add_image(offer.data, captured_at=offer.captured_at, rules=offer.rules,
                                     captured_by=offer.captured_by, prediction=r.prediction, label=r.label,
                                     stage=r.stage, model_digest=digest, source=offer.source,
                                     scores=dict(r.scores), detector_scores=dict(r.detector_scores),
                                     degraded=r.degraded, boxes=boxes, explanation=r.explanation)
        except (OSError, ValueError) as e:
            log.warning("hard case not written: %s", e)
            with self.lock:
                self._drop("write_error")
            return
        with self.lock:
            if sample is None:
                self.caps.refund()
                self._drop("duplicate")
                return
            self.disk_bytes = store.bytes
            self.captured[offer.captured_by] += 1
            self.on_captured(offer.captured_by)

    def _compact(self, store: HardCaseStore) -> None:
        try:
            store.compact()
        except OSError as e:
            log.warning("hard cases: labels.json not rewritten: %s", e)

    def close(self) -> None:
        """Write what is queued, compact, release the directory."""
        if self.thread is None:
            return
        self.queue.put(None)
        self.thread.join()
        self.thread = None
        assert self.store is not None
        self.store.close()

    def summary(self) -> dict:
        with self.lock:
            return {"matched": dict(self.matched), "captured": dict(self.captured), "dropped": dict(self.dropped)}


def engine_digest(engine: Engine) -> str:
    """The content digest of the bundle an Engine was loaded from (the shared cache keys answers by it too)."""
    return "sha256:" + engine.content_digest


def vlm_stage_name(engine: Any) -> str | None:
    vlm = engine.cascade.vlm
    return None if vlm is None else vlm.name
