"""Prometheus metrics of one app, in a registry of its own (several apps can live in one process, e.g. tests)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, disable_created_metrics, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

# No <counter>_created / <histogram>_created series: they double the exposition and nothing here reads them
# (Prometheus' own rate() and the dashboards use the samples). prometheus_client's switch is process-wide.
disable_created_metrics()

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 9.0, 15.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BREAKER_STATES = ("closed", "open", "half_open")


class VLMCollector:
    """The VLM stage's token counters, KV-block and sequence gauges, read from Engine.vlm_stats() at scrape time:
    the runtime keeps the counts, so nothing is updated per token. A bundle without a VLM exports none."""

    def __init__(self) -> None:
        self.stats: Callable[[], dict | None] = lambda: None

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        if stats is None:
            return
        tokens = CounterMetricFamily("roadwork_vlm_tokens", "VLM tokens since start: prompt tokens (cached ones "
                                     "included), prompt tokens served from the prefix cache, generated tokens",
                                     labels=["kind"])
        for kind in ("prompt", "cached", "generated"):
            tokens.add_metric([kind], stats[f"{kind}_tokens"])
        yield tokens
        blocks = GaugeMetricFamily("roadwork_vlm_kv_blocks", "Paged KV-cache blocks in use by sequences, and free "
                                   "(free blocks may still hold reusable prefix-cache entries)", labels=["state"])
        blocks.add_metric(["used"], stats["kv_blocks_used"])
        blocks.add_metric(["free"], stats["kv_blocks_free"])
        yield blocks
        prompt = stats["prompt_tokens"]
        yield GaugeMetricFamily("roadwork_vlm_prefix_cache_hit_ratio",
                                "Share of VLM prompt tokens served from the prefix cache since start",
                                value=stats["cached_tokens"] / prompt if prompt else 0.0)
        sequences = GaugeMetricFamily("roadwork_vlm_sequences", "VLM sequences being computed and waiting for room",
                                      labels=["state"])
        sequences.add_metric(["running"], stats["running"])
        sequences.add_metric(["waiting"], stats["waiting"])
        yield sequences
        yield CounterMetricFamily("roadwork_vlm_preemptions", "VLM sequences preempted (recomputed later) because "
                                  "KV blocks ran out", value=stats["preemptions"])


class StageCollector:
    """Each cascade stage's cumulative wall time, calls and images, read from Engine.stage_timings() at scrape time
    (the first stage's time includes preprocessing): rate(seconds) / rate(calls) is a stage's latency per batch."""

    def __init__(self) -> None:
        self.timings: Callable[[], dict] = dict
        self.member_timings: Callable[[], dict] = dict

    def collect(self) -> Iterator[Metric]:
        yield from self.collect_stages()
        yield from self.collect_members()

    def collect_members(self) -> Iterator[Metric]:
        """Each detector ensemble member's own time, calls and images: rate(seconds) / rate(calls) is its
        latency per batch (on CUDA measured by events on its stream)."""
        families = {
            "seconds": CounterMetricFamily("roadwork_detector_seconds", "Time each detector ensemble member "
                                           "spent on its batches", labels=["stage", "detector"]),
            "calls": CounterMetricFamily("roadwork_detector_calls", "Batches each detector ensemble member "
                                         "answered", labels=["stage", "detector"]),
            "images": CounterMetricFamily("roadwork_detector_images", "Images each detector ensemble member "
                                          "scored", labels=["stage", "detector"]),
        }
        for stage, members in self.member_timings().items():
            for member, timing in members.items():
                for field, family in families.items():
                    family.add_metric([stage, member], getattr(timing, field))
        yield from families.values()

    def collect_stages(self) -> Iterator[Metric]:
        timings = self.timings()
        families = {
            "seconds": CounterMetricFamily("roadwork_stage_seconds", "Wall time the inference worker spent in each "
                                           "cascade stage (the first stage's includes preprocessing)",
                                           labels=["stage"]),
            "calls": CounterMetricFamily("roadwork_stage_calls", "Batches each cascade stage ran", labels=["stage"]),
            "images": CounterMetricFamily("roadwork_stage_images", "Images each cascade stage saw", labels=["stage"]),
        }
        for stage, timing in timings.items():
            for field, family in families.items():
                family.add_metric([stage], getattr(timing, field))
        yield from families.values()


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter("roadwork_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.request_latency = Histogram("roadwork_http_request_duration_seconds",
                                         "Time from request start to response, by route", ["route"],
                                         buckets=LATENCY_BUCKETS_S, registry=r)
        self.images = Counter("roadwork_images", "Images answered, by outcome (computed, cached, error code)",
                              ["outcome"], registry=r)
        self.decode_latency = Histogram("roadwork_decode_duration_seconds", "Time to decode one image",
                                        buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_wait = Histogram("roadwork_queue_wait_seconds",
                                    "Time an image waited in the queue before its batch started",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("roadwork_batch_size", "Images per Engine.predict call",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.compute_latency = Histogram("roadwork_compute_duration_seconds",
                                         "Engine.predict wall time per batch", buckets=LATENCY_BUCKETS_S,
                                         registry=r)
        self.queue_depth = Gauge("roadwork_queue_depth", "Images waiting for a batch", registry=r)
        self.queue_dropped = Counter("roadwork_queue_dropped",
                                     "Images dropped without computing them, by reason",
                                     ["reason"], registry=r)
        self.stage_exits = Counter("roadwork_stage_exits", "Computed images by the stage that decided them",
                                   ["stage"], registry=r)
        self.degraded = Counter("roadwork_degraded", "Computed images answered by a fallback stage", registry=r)
        self.cache_hits = Counter("roadwork_cache_hits", "Result cache hits", registry=r)
        self.cache_misses = Counter("roadwork_cache_misses", "Result cache misses", registry=r)
        self.cache_entries = Gauge("roadwork_cache_entries", "Entries in the result cache", registry=r)
        self.cache_bytes = Gauge("roadwork_cache_bytes", "Estimated size of the result cache", registry=r)
        self.ready = Gauge("roadwork_ready", "1 once every model is loaded and warmed up", registry=r)
        self.breaker_state = Gauge("roadwork_stage_breaker_state",
                                   "1 for each stage's current circuit-breaker state, 0 for the others",
                                   ["stage", "state"], registry=r)
        self.stage_states: Callable[[], dict[str, str]] = dict
        self.warmup_duration = Gauge("roadwork_warmup_duration_seconds", "Time Engine.warmup took",
                                     registry=r)
        self.streams = Counter("roadwork_streams", "/v1/predict/stream responses once streaming began, by outcome "
                               "(completed, client_disconnected, or the code of the error event that ended it)",
                               ["outcome"], registry=r)
        self.admitted_bytes = Gauge("roadwork_admitted_bytes", "Decode memory held against --decode-memory-mb: "
                                    "decodes' estimated peaks and queued images' arrays", registry=r)
        self.body_bytes = Gauge("roadwork_body_bytes", "Request body bytes being read and parsed "
                                "(--body-memory-mb)", registry=r)
        self.connections = Gauge("roadwork_connections", "Open client connections (--max-connections)", registry=r)
        self.explanations = Gauge("roadwork_explanations", "Explanations being decoded (--max-explanations)",
                                  registry=r)
        self.vlm = VLMCollector()
        r.register(self.vlm)
        self.stages = StageCollector()
        r.register(self.stages)
        self.hardcases_matched = Counter("roadwork_hardcases_matched", "Answered images matching a hard-case "
                                         "capture rule (--hardcases), by rule; one image can match several",
                                         ["rule"], registry=r)
        self.hardcases_captured = Counter("roadwork_hardcases_captured", "Hard cases written to disk, by the rule "
                                          "whose sampling draw captured them", ["rule"], registry=r)
        self.hardcases_dropped = Counter("roadwork_hardcases_dropped", "Hard cases sampled for capture but not "
                                         "written, by reason (rate caps, queue_full, disk_full, duplicate, "
                                         "write_error)", ["reason"], registry=r)
        self.precision = Gauge("roadwork_precision", "1 for the vision models' precision: dtype, int8 kernel "
                               "(quantize) and how it was set (auto: measured at startup, explicit, cuda default)",
                               ["dtype", "quantize", "how"], registry=r)
        self.precision_speedup = Gauge("roadwork_precision_speedup", "Measured GEMM speed of the chosen precision "
                                       "over fp32 at the model's shapes, at startup (1 when not measured)",
                                       registry=r)

    def report_precision(self, choice: dict | None) -> None:
        """Engine.describe()["precision"] (runtime/models/auto_precision.py PrecisionChoice.describe()), or None."""
        if choice is None:
            return
        self.precision.labels(choice["dtype"], choice["quantize"], choice["how"]).set(1)
        self.precision_speedup.set(choice["speedup_vs_fp32"] or 1.0)

    def track(self, queue_depth: Callable[[], int], cache_entries: Callable[[], int],
              cache_bytes: Callable[[], int], stage_states: Callable[[], dict[str, str]],
              vlm_stats: Callable[[], dict | None], stage_timings: Callable[[], dict],
              member_timings: Callable[[], dict]) -> None:
        """Gauges read live values at scrape time instead of being updated on every change."""
        self.queue_depth.set_function(queue_depth)
        self.cache_entries.set_function(cache_entries)
        self.cache_bytes.set_function(cache_bytes)
        self.stage_states = stage_states
        self.vlm.stats = vlm_stats
        self.stages.timings = stage_timings
        self.stages.member_timings = member_timings

    def render(self) -> tuple[bytes, str]:
        for stage, current in self.stage_states().items():
            for state in BREAKER_STATES:
                self.breaker_state.labels(stage, state).set(1 if state == current else 0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
