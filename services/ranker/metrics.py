"""Prometheus metrics of the ranker service, on a registry per app (served at `GET /metrics`).

pairloop_ranker_requests_total{route,status}       requests answered, by HTTP status
pairloop_ranker_request_seconds{route}             latency histogram
pairloop_ranker_items_total{route}                 items ranked / compared / selected
pairloop_ranker_truncations_total{part}            prompts / candidates cut to the limits
pairloop_ranker_replica_requests_total{replica,device}  requests dispatched to each replica

Per replica (labels replica="0".."N-1" and its device; one replica unless --devices):
pairloop_ranker_comparisons_total                  sequences through the model (pairs for PairRM)
pairloop_ranker_batch_size                         sequences per forward pass (histogram)
pairloop_ranker_batch_requests                     distinct requests per forward pass (histogram):
                                                   > 1 means concurrent requests were batched
pairloop_ranker_batch_tokens_total{kind}           real vs padded tokens fed to the model
pairloop_ranker_forward_seconds                    time per forward pass (histogram)
pairloop_ranker_oom_splits_total                   forward passes split in halves after running
                                                   out of device memory (then retried)
pairloop_ranker_batch_budget_bytes                 memory the last planned passes could use
"""

from __future__ import annotations

import copy

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RankerMetrics"]

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


_REPLICA = ["replica", "device"]


class RankerMetrics:
    """All of the service's metrics, registered on their own registry (tests build many apps).

    A backend's batcher records into `self.labels` (its replica): `for_replica` gives each
    replica a view sharing the same metric objects with its own labels.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"replica": "0", "device": "cpu"}  # a batcher built outside a service
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
            _REPLICA,
            registry=r,
        )
        self.batch_size = Histogram(
            "pairloop_ranker_batch_size",
            "Sequences per forward pass",
            _REPLICA,
            buckets=_SIZES,
            registry=r,
        )
        self.batch_requests = Histogram(
            "pairloop_ranker_batch_requests",
            "Distinct requests whose work shared one forward pass",
            _REPLICA,
            buckets=_SIZES,
            registry=r,
        )
        self.batch_tokens = Counter(
            "pairloop_ranker_batch_tokens",
            "Tokens fed to the model: real, or padding added by batching",
            ["kind", *_REPLICA],
            registry=r,
        )
        self.forward_seconds = Histogram(
            "pairloop_ranker_forward_seconds",
            "Time per forward pass",
            _REPLICA,
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
            _REPLICA,
            registry=r,
        )
        self.batch_budget_bytes = Gauge(
            "pairloop_ranker_batch_budget_bytes",
            "Estimated memory the last planned forward passes could use (0: no budget)",
            _REPLICA,
            registry=r,
        )
        self.replica_requests = Counter(
            "pairloop_ranker_replica_requests",
            "Requests dispatched to each replica (the least loaded when they arrive)",
            _REPLICA,
            registry=r,
        )
        for part in ("prompt", "candidate"):
            self.truncations.labels(part=part)

    def for_replica(self, index: int, device: str) -> RankerMetrics:
        """A view of these metrics for replica `index` on `device` (same registry and metrics)."""
        view = copy.copy(self)
        view.labels = {"replica": str(index), "device": device}
        view.declare_replica()
        return view

    def declare_replica(self) -> None:
        # Every series of a replica exists from its start (0 until used): dashboards and
        # tests see a replica that did no work, rather than no replica.
        for metric in (
            self.comparisons,
            self.batch_size,
            self.batch_requests,
            self.forward_seconds,
            self.oom_splits,
            self.batch_budget_bytes,
            self.replica_requests,
        ):
            metric.labels(**self.labels)
        for kind in ("real", "padding"):
            self.batch_tokens.labels(kind=kind, **self.labels)
