"""The orchestrator API app: `pairloop api` serves it.

GET  /health, /ready
GET  /runs, /runs/{run_id}                 run status (manifest, per-iteration figures)
POST /runs, /runs/{run_id}/cancel          start / cancel (bearer token: PAIRLOOP_ORCHESTRATOR_API_TOKEN)
POST /v1/chat/completions                  best-of-n chat completions (generator + ranker)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from orchestrator.api.routes import chat, runs
from orchestrator.clients import GeneratorClient, RankerClient
from orchestrator.settings import OrchestratorSettings
from pairloop.http import MaxBodySizeMiddleware, register_exception_handlers

__all__ = ["create_app"]


def create_app(settings: OrchestratorSettings | None = None) -> FastAPI:
    settings = settings or OrchestratorSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.runs_root = Path(settings.runs_root or "runs").resolve()
        app.state.runs_root.mkdir(parents=True, exist_ok=True)
        app.state.generator = GeneratorClient(settings.generator_url, timeout=600.0, retries=2)
        app.state.ranker = RankerClient(settings.ranker_url, timeout=600.0, retries=2)
        try:
            yield
        finally:
            await app.state.generator.aclose()
            await app.state.ranker.aclose()
            # Runs started here keep going on their own; they are not this process's children to kill.

    app = FastAPI(title="pairloop orchestrator", lifespan=lifespan)
    register_exception_handlers(app)
    app.add_middleware(MaxBodySizeMiddleware, max_bytes=4 << 20)
    app.include_router(runs.router)
    app.include_router(chat.router)

    @app.get("/health", tags=["health"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["health"])
    async def ready() -> JSONResponse:
        up = await app.state.generator.ready() and await app.state.ranker.ready()
        return JSONResponse({"ready": up}, status_code=200 if up else 503)

    return app
