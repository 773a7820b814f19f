"""FastAPI dependencies of the ranker routes: the service object living on `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.ranker.service import RankingService

__all__ = ["ServiceDep", "get_service"]


def get_service(request: Request) -> RankingService:
    service: RankingService = request.app.state.service
    return service


ServiceDep = Annotated[RankingService, Depends(get_service)]
