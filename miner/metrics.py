"""The miner's own Prometheus metrics, in their own registry, served on their own port."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OUTCOMES = ("answered", "blacklisted", "failed", "timed_out")
FAILURE_REASONS = ("bad_image", "server_unreachable", "server_error", "bad_answer", "timeout", "inference_failed",
                   "internal_error")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 9.0, 12.0)


class MinerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("roadwork_miner_requests", "ImageSynapse requests by outcome (answered, blacklisted, "
                                "failed, timed_out)", ["outcome"], registry=self.registry)
        self.failures = Counter("roadwork_miner_failures", "Forwards that answered no prediction, by reason",
                                ["reason"], registry=self.registry)
        self.forward_latency = Histogram("roadwork_miner_forward_seconds", "Forward time, from entering the miner's "
                                         "forward to the answer (slot wait included)", buckets=LATENCY_BUCKETS,
                                         registry=self.registry)
        self.waiting = Gauge("roadwork_miner_waiting", "Forwards waiting for a slot", registry=self.registry)
        self.running = Gauge("roadwork_miner_running", "Forwards holding a slot", registry=self.registry)
        self.sync_age = Gauge("roadwork_miner_metagraph_sync_age_seconds", "Seconds since the last successful "
                              "metagraph sync (+Inf before the first)", registry=self.registry)
        self.metagraph_neurons = Gauge("roadwork_miner_metagraph_neurons", "Neurons in the current metagraph view",
                                       registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)

    def track(self, waiting: Callable[[], float], running: Callable[[], float], sync_age: Callable[[], float],
              neurons: Callable[[], float]) -> None:
        self.waiting.set_function(waiting)
        self.running.set_function(running)
        self.sync_age.set_function(sync_age)
        self.metagraph_neurons.set_function(neurons)

    def serve(self, host: str, port: int):
        """Start /metrics on host:port (0 picks a free port); returns the WSGI server (server_port, shutdown())."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
