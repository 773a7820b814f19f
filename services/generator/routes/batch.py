"""POST /v1/batch/chat: many conversations x n samples in one call, all under one weight version."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from pairloop.contracts.generator import BatchChatRequest, BatchChatResponse
from pairloop.http import error_responses
from services.generator import serving
from services.generator.deps import RuntimeDep, SettingsDep

router = APIRouter(prefix="/v1/batch", tags=["batch"])


@router.post("/chat", response_model=BatchChatResponse, responses=error_responses(400, 413, 503))
async def batch_chat(
    body: BatchChatRequest, runtime: RuntimeDep, settings: SettingsDep
) -> Response:
    """The orchestrator's path: one HTTP round trip for a whole shard of prompts."""
    return await serving.batch_chat(runtime, body, settings.model_name)
