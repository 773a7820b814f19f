"""Routes of the ranker service: `/v1/rank`, `/v1/compare`, `/v1/select`, and health/metrics.

Handlers are thin: the contract models (`pairloop.contracts.ranker`) validate bodies, the service
object does the work, `pairloop.http` maps every error to the one JSON error shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pairloop.contracts.health import health_identity
from pairloop.contracts.ranker import (
    CompareRequest,
    CompareResponse,
    RankRequest,
    RankResponse,
    SelectRequest,
    SelectResponse,
)
from pairloop.http import error_json, error_responses
from services.ranker.deps import ServiceDep

__all__ = ["health_router", "ranking_router"]

ranking_router = APIRouter(prefix="/v1", tags=["ranking"])
health_router = APIRouter(tags=["health"])

_ERRORS = error_responses(400, 413, 500, 503)


@ranking_router.post("/rank", responses=_ERRORS)
async def rank(body: RankRequest, service: ServiceDep) -> RankResponse:
    """Score and rank each item's candidates (full: n(n-1) comparisons; bubble: best/worst only)."""
    return await service.rank(body)


@ranking_router.post("/compare", responses=_ERRORS)
async def compare(body: CompareRequest, service: ServiceDep) -> CompareResponse:
    """Probability that `a` beats `b` for each item, both orders averaged."""
    return await service.compare(body)


@ranking_router.post("/select", responses=_ERRORS)
async def select(body: SelectRequest, service: ServiceDep) -> SelectResponse:
    """The best (or worst) candidate of each item: best-of-n serving."""
    return await service.select(body)


@health_router.get("/health")
async def health(service: ServiceDep) -> dict[str, str | int | None]:
    """The process is up (the model may still be loading); `pid` and `instance` say which
    process answers (`pairloop.contracts.health`)."""
    return {"status": "ok", **health_identity(service.settings.instance_id)}


@health_router.get("/ready", responses=error_responses(503))
async def ready(service: ServiceDep) -> Any:
    """200 once every replica has loaded and run (the body lists them); 503 (with the reason)
    before, or if one failed."""
    if not service.ready:
        # Answered, not raised: probes poll this, and "not ready yet" is not an error to log.
        reason = (
            f"the ranker failed to load: {service.error}"
            if service.error is not None
            else f"the ranker is loading its model: {service.loading_state}"
        )
        return error_json(503, reason, error_type="service_unavailable")
    return {"status": "ready", **service.describe()}


@health_router.get("/metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics (see services/ranker/metrics.py)."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
