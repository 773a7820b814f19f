"""HTTP routes of the generator, one module per resource; `api_router` includes them all."""

from __future__ import annotations

from fastapi import APIRouter

from services.generator.routes import admin, batch, health, openai

__all__ = ["api_router"]

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(openai.router)
api_router.include_router(batch.router)
api_router.include_router(admin.router)
