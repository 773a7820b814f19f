"""Typed client of the ranker service (contract: `pairloop.contracts.ranker`)."""

from __future__ import annotations

from orchestrator.clients.base import ServiceClient
from pairloop.contracts.ranker import (
    CompareRequest,
    CompareResponse,
    RankRequest,
    RankResponse,
    SelectRequest,
    SelectResponse,
)

__all__ = ["RankerClient"]


class RankerClient(ServiceClient):
    service = "ranker"

    async def rank(self, request: RankRequest) -> RankResponse:
        return await self.call("POST", "/v1/rank", RankResponse, body=request)

    async def compare(self, request: CompareRequest) -> CompareResponse:
        return await self.call("POST", "/v1/compare", CompareResponse, body=request)

    async def select(self, request: SelectRequest) -> SelectResponse:
        return await self.call("POST", "/v1/select", SelectResponse, body=request)
