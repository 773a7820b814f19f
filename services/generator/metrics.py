"""Prometheus metrics of the generator, on a registry of its own (served at GET /metrics).

A private registry, not prometheus-client's global one: two apps in one process (tests, the
benchmark) must not collide, and vLLM registers its own collectors globally.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GeneratorMetrics", "RequestMetricsMiddleware"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_SWAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GeneratorMetrics:
    """Every metric the service exports; names start with `pairloop_generator_`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "pairloop_generator"
        self.requests = Counter(
            f"{p}_requests",
            "HTTP requests by route template and status code",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{p}_request_seconds",
            "HTTP request latency, first byte in to last byte out",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{p}_prompt_tokens", "prompt tokens of finished generation requests", registry=r
        )
        self.generation_tokens = Counter(
            f"{p}_generation_tokens", "tokens generated (all samples)", registry=r
        )
        self.batch_item_errors = Counter(
            f"{p}_batch_item_errors",
            "conversations of /v1/batch/chat answered with an error entry (the rest were served)",
            registry=r,
        )
        self.in_flight = Gauge(
            f"{p}_in_flight_requests", "generation requests holding the swap gate", registry=r
        )
        self.waiting_for_swap = Gauge(
            f"{p}_requests_waiting_for_swap", "generation requests held back by a swap", registry=r
        )
        self.gate_closed = Gauge(
            f"{p}_gate_closed",
            "1 while a swap holds the gate: new requests wait, in-flight ones drain",
            registry=r,
        )
        self.held_by_swap = Counter(
            f"{p}_requests_held_by_swap",
            "generation requests that arrived while a swap held the gate and waited for it",
            registry=r,
        )
        self.requeued = Counter(
            f"{p}_requeued_requests",
            "requests stopped by a swap in abort mode and re-run on the new weights",
            registry=r,
        )
        self.swaps = Counter(
            f"{p}_swaps", "weight swap attempts by outcome", ["outcome"], registry=r
        )
        self.swap_seconds = Histogram(
            f"{p}_swap_seconds",
            "wall time of successful weight swaps, validation included",
            buckets=_SWAP_BUCKETS,
            registry=r,
        )
        self.swap_in_progress = Gauge(
            f"{p}_swap_in_progress", "1 while a weight swap runs", registry=r
        )
        self.weight_version = Info(
            f"{p}_weight",
            "the weight version being served and where it was loaded from",
            registry=r,
        )
        self.engine_ready = Gauge(
            f"{p}_engine_ready",
            "1 when the engine serves, 0 while loading or when dead",
            registry=r,
        )
        for outcome in ("ok", "invalid", "conflict", "rolled_back", "engine_dead", "timeout"):
            self.swaps.labels(outcome=outcome)
        # Time-shared placement: the engine gives its memory back for training, then wakes.
        self.releases = Counter(
            f"{p}_releases",
            "engine releases by outcome (ok, noop, timeout)",
            ["outcome"],
            registry=r,
        )
        self.wakes = Counter(
            f"{p}_wakes",
            "wakes by outcome (ok, rolled_back, engine_dead; swapped: the engine was serving)",
            ["outcome"],
            registry=r,
        )
        self.release_seconds = Histogram(
            f"{p}_release_seconds", "wall time of releases", buckets=_SWAP_BUCKETS, registry=r
        )
        self.wake_seconds = Histogram(
            f"{p}_wake_seconds",
            "wall time of wakes, validation and engine rebuild included",
            buckets=_SWAP_BUCKETS,
            registry=r,
        )
        self.released = Gauge(
            f"{p}_released", "1 while the engine's memory is given back", registry=r
        )
        for outcome in ("ok", "noop", "timeout"):
            self.releases.labels(outcome=outcome)
        for outcome in ("ok", "rolled_back", "engine_dead", "swapped"):
            self.wakes.labels(outcome=outcome)

    def set_version(self, version: str, path: str) -> None:
        self.weight_version.info({"version": version, "path": path})


class RequestMetricsMiddleware:
    """Count requests and time them, labelled by route template (bounded cardinality)."""

    def __init__(self, app: ASGIApp, *, metrics: GeneratorMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The router writes the matched route into the scope; unmatched paths share one label.
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=label, status=str(status)).inc()
            self.metrics.request_seconds.labels(route=label).observe(time.perf_counter() - start)
