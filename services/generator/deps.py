"""What routes depend on: the running engine's objects (503 until loaded) and the admin guard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from pairloop.auth import check_bearer
from pairloop.contracts.generator import EngineState
from pairloop.errors import EngineDeadError, ServiceUnavailableError
from services.generator.gate import SwapGate
from services.generator.generation import GenerationService
from services.generator.settings import GeneratorSettings

if TYPE_CHECKING:
    from services.generator.engine import VllmEngine
    from services.generator.release import ReleaseController
    from services.generator.swap import WeightSwapper

__all__ = [
    "AdminDep",
    "AnyStateRuntimeDep",
    "Runtime",
    "RuntimeDep",
    "SettingsDep",
    "get_runtime",
    "require_admin",
]


@dataclass
class Runtime:
    """Everything that exists once the engine is up; lives on `app.state.runtime`."""

    engine: VllmEngine
    gate: SwapGate
    generation: GenerationService
    # None when the starting checkpoint has no safetensors manifest to validate swaps against.
    swapper: WeightSwapper | None
    swap_unavailable_reason: str | None = None
    # Release and wake (time-shared placement); None exactly when `swapper` is.
    release: ReleaseController | None = None

    @property
    def state(self) -> EngineState:
        """serving | releasing | released | waking"""
        return self.release.state if self.release is not None else "serving"


def engine_state(request: Request) -> str:
    """loading | ready | dead | failed | releasing | released | waking"""
    state = request.app.state
    if state.runtime is None:
        return "failed" if state.load_error else "loading"
    if state.runtime.engine.dead_reason:
        return "dead"
    return "ready" if state.runtime.state == "serving" else state.runtime.state


def get_runtime(request: Request) -> Runtime:
    """The runtime of a serving engine; 503 while loading, released (with Retry-After) or dead."""
    runtime = get_runtime_any_state(request)
    if runtime.release is not None and runtime.release.state != "serving":
        raise runtime.release.unavailable()
    return runtime


def get_runtime_any_state(request: Request) -> Runtime:
    """The runtime once loaded, released or not (for /v1/models and the admin routes)."""
    state = request.app.state
    runtime: Runtime | None = state.runtime
    if runtime is None:
        if state.load_error:
            raise EngineDeadError(f"the engine failed to start: {state.load_error}")
        raise ServiceUnavailableError(
            "the engine is still loading; retry when GET /ready answers 200"
        )
    dead = runtime.engine.dead_reason
    if dead is not None:
        raise EngineDeadError(f"engine dead: {dead}; restart the service")
    return runtime


def get_settings(request: Request) -> GeneratorSettings:
    return request.app.state.settings


def require_admin(request: Request) -> None:
    """Bearer-token check; with no token configured the admin routes are off, never open."""
    token = request.app.state.settings.admin_token
    if token is None:
        raise ServiceUnavailableError("admin disabled: set --admin-token")
    check_bearer(request.headers.get("authorization"), token.get_secret_value())


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
AnyStateRuntimeDep = Annotated[Runtime, Depends(get_runtime_any_state)]
SettingsDep = Annotated[GeneratorSettings, Depends(get_settings)]
AdminDep = Annotated[None, Depends(require_admin)]
