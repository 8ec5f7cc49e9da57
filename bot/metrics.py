"""Prometheus metrics for one bot: what operators graph and alert on.

Each bot has its own registry (tests and embedded uses run several bots in one process); the
HTTP adapter serves it at ``GET /metrics``. Updated on the hot path, so only counters,
histograms and callback gauges — a few microseconds per message.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "chinwag_messages", "Inbound messages handled", ["platform"], registry=r
        )
        self.replies = Counter(
            "chinwag_replies", "Replies sent, by skill and kind", ["skill", "kind"], registry=r
        )
        self.errors = Counter(
            "chinwag_skill_errors",
            "Replies that were apologies for a failure",
            ["skill"],
            registry=r,
        )
        self.latency = Histogram(
            "chinwag_reply_latency_seconds",
            "From receipt to the reply being ready, by skill",
            ["skill"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("chinwag_inflight_messages", "Messages being handled", registry=r)
        self.model_queue = Gauge(
            "chinwag_model_queue_depth", "Generation requests waiting or running", registry=r
        )

    def track(self, inflight: Callable[[], float], model_queue: Callable[[], float]) -> None:
        self.inflight.set_function(inflight)
        self.model_queue.set_function(model_queue)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
