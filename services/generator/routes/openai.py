"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from pairloop.contracts.generator import (
    VERSION_HEADER,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from pairloop.http import error_responses
from services.generator import serving
from services.generator.deps import AnyStateRuntimeDep, RuntimeDep, SettingsDep

router = APIRouter(prefix="/v1", tags=["openai"])

_ERRORS = error_responses(400, 404, 413, 503)


@router.get("/models", response_model=ModelList, responses=error_responses(503))
async def list_models(runtime: AnyStateRuntimeDep, settings: SettingsDep) -> Response:
    """The served model; `state` says whether it serves or is released (time-shared placement)."""
    card = ModelCard(
        id=settings.model_name,
        root=settings.model,
        weight_version=runtime.gate.version,
        dtype=runtime.engine.dtype,
        max_model_len=runtime.engine.max_model_len,
        state=runtime.state,
    )
    return JSONResponse(
        ModelList(data=[card]).model_dump(mode="json"),
        headers={VERSION_HEADER: runtime.gate.version},
    )


@router.post("/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(
    body: CompletionRequest, runtime: RuntimeDep, settings: SettingsDep
) -> Response:
    """Raw-prompt completions; `stream=true` answers server-sent events."""
    return await serving.completion(runtime, body, settings.model_name)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(
    body: ChatCompletionRequest, runtime: RuntimeDep, settings: SettingsDep
) -> Response:
    """Chat completions through the model's chat template; `stream=true` answers SSE."""
    return await serving.chat_completion(runtime, body, settings.model_name)
