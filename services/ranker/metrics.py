"""Prometheus metrics of the ranker service, on a registry per app (served at `GET /metrics`).

pairloop_ranker_requests_total{route,status}       requests answered, by HTTP status
pairloop_ranker_request_seconds{route}             latency histogram
pairloop_ranker_items_total{route}                 items ranked / compared / selected
pairloop_ranker_comparisons_total                  sequences through the model (pairs for PairRM)
pairloop_ranker_batch_size                         sequences per forward pass (histogram)
pairloop_ranker_batch_requests                     distinct requests per forward pass (histogram):
                                                   > 1 means concurrent requests were batched
pairloop_ranker_batch_tokens_total{kind}           real vs padded tokens fed to the model
pairloop_ranker_forward_seconds                    time per forward pass (histogram)
pairloop_ranker_truncations_total{part}            prompts / candidates cut to the limits
pairloop_ranker_oom_splits_total                   forward passes split in halves after running
                                                   out of device memory (then retried)
pairloop_ranker_batch_budget_bytes                 memory the last planned passes could use
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RankerMetrics"]

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RankerMetrics:
    """All of the service's metrics, registered on their own registry (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pairloop_ranker_requests", "Requests answered", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "pairloop_ranker_request_seconds",
            "Request latency",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.items = Counter("pairloop_ranker_items", "Items served", ["route"], registry=r)
        self.comparisons = Counter(
            "pairloop_ranker_comparisons",
            "Sequences run through the model (one per ordered pair for PairRM)",
            registry=r,
        )
        self.batch_size = Histogram(
            "pairloop_ranker_batch_size", "Sequences per forward pass", buckets=_SIZES, registry=r
        )
        self.batch_requests = Histogram(
            "pairloop_ranker_batch_requests",
            "Distinct requests whose work shared one forward pass",
            buckets=_SIZES,
            registry=r,
        )
        self.batch_tokens = Counter(
            "pairloop_ranker_batch_tokens",
            "Tokens fed to the model: real, or padding added by batching",
            ["kind"],
            registry=r,
        )
        self.forward_seconds = Histogram(
            "pairloop_ranker_forward_seconds",
            "Time per forward pass",
            buckets=_LATENCY,
            registry=r,
        )
        self.truncations = Counter(
            "pairloop_ranker_truncations",
            "Inputs cut to the model's limits",
            ["part"],
            registry=r,
        )
        self.oom_splits = Counter(
            "pairloop_ranker_oom_splits",
            "Forward passes split in halves after an out-of-memory error, then retried",
            registry=r,
        )
        self.batch_budget_bytes = Gauge(
            "pairloop_ranker_batch_budget_bytes",
            "Estimated memory the last planned forward passes could use (0: no budget)",
            registry=r,
        )
        for part in ("prompt", "candidate"):
            self.truncations.labels(part=part)
        for kind in ("real", "padding"):
            self.batch_tokens.labels(kind=kind)
