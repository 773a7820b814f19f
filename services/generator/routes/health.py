"""GET /health (process up), GET /ready (engine usable, else 503 saying why), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pairloop.contracts.health import health_identity
from pairloop.http import error_responses
from services.generator.deps import RuntimeDep, engine_state

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> dict[str, str | int | None]:
    """200 while the process runs; `engine` says loading, ready, dead or failed; `pid` and
    `instance` say which process answers (`pairloop.contracts.health`)."""
    instance = request.app.state.settings.instance_id
    return {"status": "ok", "engine": engine_state(request), **health_identity(instance)}


@router.get("/ready", responses=error_responses(503))
async def ready(runtime: RuntimeDep) -> dict[str, str]:
    """200 once the engine serves; 503 while it loads, or if it died."""
    return {"status": "ready", "weight_version": runtime.gate.version}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
