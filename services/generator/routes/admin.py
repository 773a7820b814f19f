"""Admin routes (bearer token): POST /admin/weights swaps the served weights in place (see
services.generator.swap); POST /admin/release and /admin/wake give the engine's memory back for
training and bring it back onto new weights (time-shared placement; services.generator.release)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from pairloop.contracts.generator import (
    VERSION_HEADER,
    ReleaseRequest,
    ReleaseResponse,
    WakeRequest,
    WakeResponse,
    WeightSwapRequest,
    WeightSwapResponse,
)
from pairloop.errors import ServiceUnavailableError
from pairloop.http import error_responses
from services.generator.deps import AdminDep, AnyStateRuntimeDep, Runtime, RuntimeDep
from services.generator.release import ReleaseController

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post(
    "/weights",
    response_model=WeightSwapResponse,
    responses=error_responses(400, 401, 403, 409, 503),
)
async def swap_weights(_: AdminDep, body: WeightSwapRequest, runtime: RuntimeDep) -> JSONResponse:
    """Validate the checkpoint, then reload it in place; on failure the old weights keep serving."""
    if runtime.swapper is None:
        raise ServiceUnavailableError(
            f"weight swaps are unavailable: {runtime.swap_unavailable_reason}"
        )
    result = await runtime.swapper.swap(body)
    return JSONResponse(result.model_dump(mode="json"), headers={VERSION_HEADER: result.version})


def _controller(runtime: Runtime) -> ReleaseController:
    if runtime.release is None:
        raise ServiceUnavailableError(
            f"release and wake are unavailable: {runtime.swap_unavailable_reason}"
        )
    return runtime.release


@router.post(
    "/release",
    response_model=ReleaseResponse,
    responses=error_responses(401, 403, 409, 503),
)
async def release(
    _: AdminDep, runtime: AnyStateRuntimeDep, body: ReleaseRequest | None = None
) -> ReleaseResponse:
    """Free the engine's memory (GPU: vLLM sleep level 2; CPU: engine shut down); requests get
    503 with Retry-After until the wake. Releasing a released engine is a no-op."""
    return await _controller(runtime).release(body or ReleaseRequest())


@router.post(
    "/wake",
    response_model=WakeResponse,
    responses=error_responses(400, 401, 403, 409, 503),
)
async def wake(_: AdminDep, body: WakeRequest, runtime: AnyStateRuntimeDep) -> JSONResponse:
    """Serve again, straight from the checkpoint at `path` as `version` (validated like a swap);
    if it cannot be loaded, the previous weights serve and the 400 says why. On a serving
    engine: a weight swap (a no-op when `version` already serves from `path`)."""
    result = await _controller(runtime).wake(body)
    return JSONResponse(result.model_dump(mode="json"), headers={VERSION_HEADER: result.version})
