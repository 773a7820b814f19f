"""The ranking service object behind the routes: loading, caps, request ids and metrics.

It holds one backend replica per device (`--devices`; one with `--device`) and leases each request
to the least-loaded one (services.ranker.replicas).

Routes stay thin: they validate the body (the contract models do that), then call one method here.
The backend is loaded in the background at startup so that `/health` answers at once and `/ready`
says 503 until every replica has run a first forward pass; if loading fails, `/ready` reports why and
`on_fatal` stops the server (a process that can never serve should exit, not idle).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from pairloop.contracts.ranker import (
    CompareRequest,
    CompareResponse,
    RankItem,
    RankRequest,
    RankResponse,
    SelectRequest,
    SelectResponse,
    Truncation,
)
from pairloop.errors import ServiceUnavailableError, ValidationError
from services.ranker.metrics import RankerMetrics
from services.ranker.replicas import ReplicaPool, load_replicas, resolve_devices
from services.ranker.settings import RankerSettings

__all__ = ["RankingService"]

log = logging.getLogger(__name__)


class RankingService:
    """Owns the backend replicas for the app's lifetime and answers the three ranking routes."""

    def __init__(self, settings: RankerSettings, metrics: RankerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pool: ReplicaPool | None = None
        self.error: str | None = None
        self.devices: list[str] = settings.replica_devices()  # cuda:all resolved by load()
        self._loaded: set[int] = set()
        self._request_ids = itertools.count(1)

    async def load(self, on_fatal: Callable[[], None] | None = None) -> None:
        s = self.settings
        started = time.perf_counter()
        try:
            self.devices = await asyncio.to_thread(resolve_devices, s)
            replicas = await load_replicas(s, self.metrics, self.devices, self._loaded.add)
        except Exception as exc:  # any failure here is fatal, and must be reported as such
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("could not load %s backend from %r: %s", s.backend, s.model, self.error)
            if on_fatal is not None:
                on_fatal()
            return
        self.pool = ReplicaPool(replicas, self.metrics)
        log.info(
            "ready: %s backend, model %r on %s (%s) in %.1fs",
            s.backend,
            s.model,
            ", ".join(self.devices),
            s.dtype,
            time.perf_counter() - started,
        )

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    @property
    def ready(self) -> bool:
        """Every replica has loaded and run once: one that cannot is an error, not a degraded
        service (a missing GPU would otherwise go unnoticed until ranking is slow)."""
        return self.pool is not None and self.pool.ready

    @property
    def loading_state(self) -> str:
        """Which replicas are ready while loading: `1 of 2 replicas ready (cuda:0, cuda:1)`."""
        return (
            f"{len(self._loaded)} of {len(self.devices)} replicas ready ({', '.join(self.devices)})"
        )

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "backend": s.backend,
            "model": s.model,
            "max_items": s.max_items,
            "max_candidates": s.max_candidates,
            "replicas": len(self.devices),
            "devices": self.devices,
            "replica_load": self.pool.describe() if self.pool is not None else [],
        }

    def _pool(self) -> ReplicaPool:
        if self.pool is not None and self.pool.ready:
            return self.pool
        if self.error is not None:
            raise ServiceUnavailableError(f"the ranker failed to load: {self.error}")
        raise ServiceUnavailableError("the ranker is loading its model; retry when /ready is 200")

    def _check_caps(self, n_items: int, candidate_counts: Sequence[int] = ()) -> None:
        s = self.settings
        if n_items > s.max_items:
            raise ValidationError(
                f"{n_items} items in one request; this server takes at most {s.max_items} "
                "(split the request, or raise --max-items)",
                param="items",
            )
        for i, n in enumerate(candidate_counts):
            if n > s.max_candidates:
                raise ValidationError(
                    f"item {i} has {n} candidates; this server takes at most {s.max_candidates} "
                    "per item (raise --max-candidates)",
                    param=f"items.{i}.candidates",
                )

    def _count(self, route: str, n_items: int, truncations: Sequence[Truncation]) -> None:
        self.metrics.items.labels(route=route).inc(n_items)
        prompts = sum(t.prompt for t in truncations)
        candidates = sum(sum(t.candidates) for t in truncations)
        if prompts:
            self.metrics.truncations.labels(part="prompt").inc(prompts)
        if candidates:
            self.metrics.truncations.labels(part="candidate").inc(candidates)

    def _prepare(self, items: Sequence[RankItem]) -> tuple[ReplicaPool, int]:
        self._check_caps(len(items), [len(i.candidates) for i in items])
        return self._pool(), next(self._request_ids)

    async def rank(self, body: RankRequest) -> RankResponse:
        pool, request = self._prepare(body.items)
        with pool.lease() as ranker:
            results = await ranker.rank(body.items, mode=body.mode, request=request)
        self._count("rank", len(body.items), [r.truncated for r in results])
        return RankResponse(
            model=ranker.model, backend=ranker.backend, mode=body.mode, results=results
        )

    async def compare(self, body: CompareRequest) -> CompareResponse:
        self._check_caps(len(body.items))
        pool, request = self._pool(), next(self._request_ids)
        with pool.lease() as ranker:
            results = await ranker.compare(body.items, request=request)
        self._count("compare", len(body.items), [r.truncated for r in results])
        return CompareResponse(model=ranker.model, backend=ranker.backend, results=results)

    async def select(self, body: SelectRequest) -> SelectResponse:
        pool, request = self._prepare(body.items)
        with pool.lease() as ranker:
            results = await ranker.select(
                body.items, pick=body.pick, mode=body.mode, request=request
            )
        self._count("select", len(body.items), [r.truncated for r in results])
        return SelectResponse(
            model=ranker.model, backend=ranker.backend, pick=body.pick, results=results
        )
