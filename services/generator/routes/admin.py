"""POST /admin/weights: swap the served weights in place (bearer token; see services.generator.swap)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from pairloop.contracts.generator import VERSION_HEADER, WeightSwapRequest, WeightSwapResponse
from pairloop.errors import ServiceUnavailableError
from pairloop.http import error_responses
from services.generator.deps import AdminDep, RuntimeDep

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
