"""Typed client of the generator service (contract: `pairloop.contracts.generator`)."""

from __future__ import annotations

from typing import Any

from orchestrator.clients.base import ServiceClient
from pairloop.contracts.generator import (
    BatchChatRequest,
    BatchChatResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelList,
    WeightSwapRequest,
    WeightSwapResponse,
)
from pairloop.errors import ServerError

__all__ = ["GeneratorClient"]


class GeneratorClient(ServiceClient):
    service = "generator"

    def __init__(self, base_url: str, *, admin_token: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._admin_token = admin_token

    async def weight_version(self) -> str:
        """The version the generator serves now."""
        models = await self.call("GET", "/v1/models", ModelList)
        if not models.data:
            raise ServerError(f"generator at {self.base_url} lists no model")
        return models.data[0].weight_version

    async def batch_chat(self, request: BatchChatRequest) -> BatchChatResponse:
        return await self.call("POST", "/v1/batch/chat", BatchChatResponse, body=request)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        return await self.call("POST", "/v1/chat/completions", ChatCompletionResponse, body=request)

    async def swap_weights(self, request: WeightSwapRequest) -> WeightSwapResponse:
        """Swap in place. Not retried: a failed swap is reported, and the caller decides."""
        headers = {"Authorization": f"Bearer {self._admin_token}"} if self._admin_token else None
        return await self.call(
            "POST", "/admin/weights", WeightSwapResponse, body=request, headers=headers, retry=False
        )
