"""Typed client of the generator service (contract: `pairloop.contracts.generator`)."""

from __future__ import annotations

from typing import Any

from orchestrator.clients.base import ServiceClient
from pairloop.contracts.generator import (
    BatchChatRequest,
    BatchChatResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
    ReleaseRequest,
    ReleaseResponse,
    WakeRequest,
    WakeResponse,
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

    async def model_card(self) -> ModelCard:
        """The served model: its weight version and state (serving, or released)."""
        models = await self.call("GET", "/v1/models", ModelList)
        if not models.data:
            raise ServerError(f"generator at {self.base_url} lists no model")
        return models.data[0]

    async def weight_version(self) -> str:
        """The version the generator serves now (or was serving when it was released)."""
        return (await self.model_card()).weight_version

    async def batch_chat(self, request: BatchChatRequest) -> BatchChatResponse:
        return await self.call("POST", "/v1/batch/chat", BatchChatResponse, body=request)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        return await self.call("POST", "/v1/chat/completions", ChatCompletionResponse, body=request)

    def _admin_headers(self) -> dict[str, str] | None:
        return {"Authorization": f"Bearer {self._admin_token}"} if self._admin_token else None

    async def swap_weights(self, request: WeightSwapRequest) -> WeightSwapResponse:
        """Swap in place. Not retried: a failed swap is reported, and the caller decides."""
        return await self.call(
            "POST",
            "/admin/weights",
            WeightSwapResponse,
            body=request,
            headers=self._admin_headers(),
            retry=False,
        )

    async def release(self, request: ReleaseRequest | None = None) -> ReleaseResponse:
        """Free the generator's accelerator memory (time-shared placement). Idempotent, so
        retried like any call."""
        return await self.call(
            "POST",
            "/admin/release",
            ReleaseResponse,
            body=request or ReleaseRequest(),
            headers=self._admin_headers(),
        )

    async def wake(self, request: WakeRequest) -> WakeResponse:
        """Serve again from `request.path` as `request.version` (a swap if it is serving).
        Idempotent, so retried on connection errors and 5xx; a 400 (the checkpoint could not be
        loaded, the previous weights serve) is raised as it is."""
        return await self.call(
            "POST", "/admin/wake", WakeResponse, body=request, headers=self._admin_headers()
        )
