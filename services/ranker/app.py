"""The ranker's FastAPI app: `create_app(settings)`; run it with `python -m services.ranker`.

The backend is loaded in the lifespan (in the background: `/health` answers during the load,
`/ready` turns 200 when the model has run once) and lives on `app.state.service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request, Response

from pairloop.http import MaxBodySizeMiddleware, register_exception_handlers
from services.ranker.metrics import RankerMetrics
from services.ranker.routes import health_router, ranking_router
from services.ranker.service import RankingService
from services.ranker.settings import RankerSettings

__all__ = ["create_app"]

_ROUTES = {"/v1/rank": "rank", "/v1/compare": "compare", "/v1/select": "select"}


def create_app(settings: RankerSettings, *, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The ranker app; `on_fatal` is called if the model cannot be loaded (e.g. stop the server)."""
    metrics = RankerMetrics()
    service = RankingService(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(service.load(on_fatal), name="load-ranker")
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await service.close()

    app = FastAPI(
        title="pairloop ranker",
        summary="PairRM (llm-blender), reward-model and programmatic rankers behind one API",
        lifespan=lifespan,
    )
    app.state.service = service
    register_exception_handlers(app)

    # An oversize body is refused before anything reads it; added first, so that the request
    # counter below sits outside it and counts those 413s too.
    app.add_middleware(MaxBodySizeMiddleware, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        route = _ROUTES.get(request.url.path)
        if route is None:
            return await call_next(request)
        started = time.perf_counter()
        response = await call_next(request)
        metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        return response

    app.include_router(health_router)
    app.include_router(ranking_router)
    return app
