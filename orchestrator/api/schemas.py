"""Request and response bodies of the orchestrator API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pairloop.contracts.generator import ChatCompletionRequest, ChatCompletionResponse

__all__ = ["BestOfChatRequest", "BestOfChatResponse", "RunDetail", "RunStartRequest", "RunSummary"]


class RunSummary(BaseModel):
    run_id: str
    status: str
    stages_done: int
    stages_total: int
    current_version: str | None
    updated_at: float
    error: str | None = None


class RunDetail(RunSummary):
    stages: dict[str, Any]
    iterations: list[dict[str, Any]]


class RunStartRequest(BaseModel):
    """Start a run: the run config as JSON (the same fields as the YAML file)."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any]
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BestOfChatRequest(ChatCompletionRequest):
    """Chat completions with PairRM best-of-n: `best_of` samples, the ranker's best is returned."""

    best_of: int = Field(16, ge=1, description="samples to draw; the recipe's best result used 16")


class BestOfChatResponse(ChatCompletionResponse):
    best_of: int
    ranker_scores: list[float] | None = None
