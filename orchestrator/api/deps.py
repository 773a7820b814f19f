"""Dependencies of the API routes: settings, clients and the runs root, all from `app.state`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from orchestrator.clients import GeneratorClient, RankerClient
from orchestrator.settings import OrchestratorSettings
from pairloop.auth import check_bearer
from pairloop.errors import ServiceUnavailableError

__all__ = ["AdminDep", "GeneratorDep", "RankerDep", "RunsRootDep", "SettingsDep"]


# `app.state` is untyped (Any): each dependency below is where its type is declared.
def _settings(request: Request) -> OrchestratorSettings:
    settings: OrchestratorSettings = request.app.state.settings
    return settings


def _generator(request: Request) -> GeneratorClient:
    generator: GeneratorClient = request.app.state.generator
    return generator


def _ranker(request: Request) -> RankerClient:
    ranker: RankerClient = request.app.state.ranker
    return ranker


def _runs_root(request: Request) -> Path:
    root: Path = request.app.state.runs_root
    return root


def _admin(request: Request) -> None:
    token = request.app.state.settings.api_token
    if token is None:
        raise ServiceUnavailableError(
            "run control is disabled: set PAIRLOOP_ORCHESTRATOR_API_TOKEN to enable start/cancel"
        )
    check_bearer(request.headers.get("authorization"), token.get_secret_value())


SettingsDep = Annotated[OrchestratorSettings, Depends(_settings)]
GeneratorDep = Annotated[GeneratorClient, Depends(_generator)]
RankerDep = Annotated[RankerClient, Depends(_ranker)]
RunsRootDep = Annotated[Path, Depends(_runs_root)]
AdminDep = Annotated[None, Depends(_admin)]
