"""Orchestrator settings from the environment (`PAIRLOOP_ORCHESTRATOR_*`, `PAIRLOOP_REDIS_URL`).

The run itself is described by the YAML run config; these are the deployment's secrets and
addresses, which never belong in a config file that gets shared and committed.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

from pairloop.settings import service_config

__all__ = ["OrchestratorSettings"]


class OrchestratorSettings(BaseSettings):
    model_config = service_config("PAIRLOOP_ORCHESTRATOR_", "pairloop")

    generator_admin_token: SecretStr | None = Field(
        None, description="bearer token for the generators' /admin/weights (their --admin-token)"
    )
    api_token: SecretStr | None = Field(
        None, description="bearer token for the status API's start/cancel routes; unset: read-only"
    )
    runs_root: str | None = Field(
        None, description="where the status API lists and creates runs; default MODEL_STORE/runs"
    )
    generator_url: str = Field(
        "http://127.0.0.1:8000", description="status API: best-of-n generator"
    )
    ranker_url: str = Field("http://127.0.0.1:8001", description="status API: best-of-n ranker")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    max_best_of: int = Field(64, ge=1, description="cap on best_of for best-of-n serving")
    log_level: str = "INFO"
    fault_kill_after: str | None = Field(
        None,
        pattern=r"^iter\d+\.(generate|rank|train):\d+$",
        description="fault injection for resume tests and drills: 'iter1.rank:2' SIGKILLs this "
        "process right after it wrote its 2nd ranking shard of iteration 1 (train: after the "
        "Nth progress report). Never set in production.",
    )
