"""The ranking service object behind the routes: loading, caps, request ids and metrics.

Routes stay thin: they validate the body (the contract models do that), then call one method here.
The backend is loaded in the background at startup so that `/health` answers at once and `/ready`
says 503 until the model has run a first forward pass; if loading fails, `/ready` reports why and
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
from services.ranker.rankers import build_ranker
from services.ranker.rankers.base import Ranker
from services.ranker.settings import RankerSettings

__all__ = ["RankingService"]

log = logging.getLogger(__name__)


class RankingService:
    """Owns the backend for the app's lifetime and answers the three ranking routes."""

    def __init__(self, settings: RankerSettings, metrics: RankerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ranker: Ranker | None = None
        self.error: str | None = None
        self._request_ids = itertools.count(1)

    async def load(self, on_fatal: Callable[[], None] | None = None) -> None:
        s = self.settings
        started = time.perf_counter()
        try:
            ranker = await asyncio.to_thread(build_ranker, s, self.metrics)
            await ranker.start()
        except Exception as exc:  # any failure here is fatal, and must be reported as such
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("could not load %s backend from %r: %s", s.backend, s.model, self.error)
            if on_fatal is not None:
                on_fatal()
            return
        self.ranker = ranker
        log.info(
            "ready: %s backend, model %r on %s (%s) in %.1fs",
            s.backend,
            s.model,
            s.device,
            s.dtype,
            time.perf_counter() - started,
        )

    async def close(self) -> None:
        if self.ranker is not None:
            ranker, self.ranker = self.ranker, None
            await ranker.close()

    @property
    def ready(self) -> bool:
        return self.ranker is not None and self.ranker.ready

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "backend": s.backend,
            "model": s.model,
            "max_items": s.max_items,
            "max_candidates": s.max_candidates,
        }

    def _ranker(self) -> Ranker:
        if self.ranker is not None and self.ranker.ready:
            return self.ranker
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

    def _prepare(self, items: Sequence[RankItem]) -> tuple[Ranker, int]:
        self._check_caps(len(items), [len(i.candidates) for i in items])
        return self._ranker(), next(self._request_ids)

    async def rank(self, body: RankRequest) -> RankResponse:
        ranker, request = self._prepare(body.items)
        results = await ranker.rank(body.items, mode=body.mode, request=request)
        self._count("rank", len(body.items), [r.truncated for r in results])
        return RankResponse(
            model=ranker.model, backend=ranker.backend, mode=body.mode, results=results
        )

    async def compare(self, body: CompareRequest) -> CompareResponse:
        self._check_caps(len(body.items))
        ranker, request = self._ranker(), next(self._request_ids)
        results = await ranker.compare(body.items, request=request)
        self._count("compare", len(body.items), [r.truncated for r in results])
        return CompareResponse(model=ranker.model, backend=ranker.backend, results=results)

    async def select(self, body: SelectRequest) -> SelectResponse:
        ranker, request = self._prepare(body.items)
        results = await ranker.select(body.items, pick=body.pick, mode=body.mode, request=request)
        self._count("select", len(body.items), [r.truncated for r in results])
        return SelectResponse(
            model=ranker.model, backend=ranker.backend, pick=body.pick, results=results
        )
