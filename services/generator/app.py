"""The generator's FastAPI app: `create_app(settings)`, with the engine built in the lifespan.

The engine takes seconds to build (much longer for a 7B model), so the lifespan starts it in the
background: the server answers /health at once and /ready with 503 until the engine serves. If it
cannot start at all, `on_fatal` is called (the entry point then exits non-zero) and /ready says why.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pairloop.checkpoints import read_manifest
from pairloop.errors import ValidationError
from pairloop.http import MaxBodySizeMiddleware, register_exception_handlers
from services.generator.deps import Runtime
from services.generator.gate import SwapGate
from services.generator.generation import GenerationService, Limits
from services.generator.metrics import GeneratorMetrics, RequestMetricsMiddleware
from services.generator.settings import GeneratorSettings

__all__ = ["create_app"]

log = logging.getLogger(__name__)


async def build_runtime(settings: GeneratorSettings, metrics: GeneratorMetrics) -> Runtime:
    """Start the engine and wire the gate, the generation service and the swapper around it."""
    # Imported in a worker thread: vLLM takes seconds to import, and the event loop must answer
    # /health and /ready meanwhile.
    engine_module = await asyncio.to_thread(importlib.import_module, "services.generator.engine")
    from services.generator.release import ReleaseController
    from services.generator.swap import WeightSwapper

    engine = await engine_module.start_engine(settings)
    try:
        gate = SwapGate(settings.initial_version, on_wait=metrics.held_by_swap.inc)
        limits = Limits(
            max_n=settings.max_n,
            max_tokens_limit=settings.max_tokens_limit,
            default_max_tokens=settings.default_max_tokens,
            max_batch_prompts=settings.max_batch_prompts,
            max_model_len=engine.max_model_len,
        )
        generation = GenerationService(engine, gate, metrics, limits)
        swapper, reason = None, None
        try:
            manifest = await asyncio.to_thread(read_manifest, engine.weights_dir)
        except ValidationError as exc:
            reason = f"the starting checkpoint cannot be validated against ({exc.message})"
            log.warning("weight swaps disabled: %s", reason)
        else:
            swapper = WeightSwapper(
                engine=engine,
                gate=gate,
                metrics=metrics,
                base_manifest=manifest,
                model_root=settings.model_root,
                default_mode=settings.swap_mode,
                drain_timeout=settings.swap_drain_timeout_s,
            )
    except BaseException:
        engine.shutdown()
        raise
    metrics.in_flight.set_function(lambda: gate.active)
    metrics.waiting_for_swap.set_function(lambda: gate.waiting)
    metrics.gate_closed.set_function(lambda: float(gate.closed))
    release = (
        ReleaseController(swapper, retry_after_s=settings.release_retry_after_s)
        if swapper is not None
        else None
    )
    return Runtime(engine, gate, generation, swapper, reason, release)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state

    async def load() -> None:
        try:
            state.runtime = await build_runtime(state.settings, state.metrics)
        except Exception as exc:
            log.critical("the engine failed to start: %s", exc, exc_info=True)
            state.load_error = f"{type(exc).__name__}: {exc}"
            if state.on_fatal is not None:
                state.on_fatal()
            return
        state.metrics.engine_ready.set(1)
        log.info(
            "engine ready: %s as %r, weight version %s",
            state.settings.model,
            state.settings.model_name,
            state.runtime.gate.version,
        )

    loader = asyncio.create_task(load(), name="engine-loader")
    try:
        yield
    finally:
        loader.cancel()
        runtime: Runtime | None = state.runtime
        state.runtime = None
        if runtime is not None:
            await asyncio.to_thread(runtime.engine.shutdown)


def create_app(
    settings: GeneratorSettings, *, on_fatal: Callable[[], None] | None = None
) -> FastAPI:
    """The app; `on_fatal` is called if the engine cannot start (the server should then exit)."""
    from services.generator.routes import api_router

    app = FastAPI(
        title="pairloop generator",
        summary="OpenAI-compatible vLLM generation with in-place, version-exact weight swaps",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics = GeneratorMetrics()
    app.state.runtime = None
    app.state.load_error = None
    app.state.on_fatal = on_fatal
    metrics.engine_ready.set(0)
    register_exception_handlers(app)
    app.include_router(api_router)
    app.add_middleware(MaxBodySizeMiddleware, max_bytes=settings.max_body_bytes)
    # Added last, so outermost: it sees the final status of every request, 413s included.
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
