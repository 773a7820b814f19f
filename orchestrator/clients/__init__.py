"""Typed clients for the services: the orchestrator's only way to reach them."""

from orchestrator.clients.base import ServiceUnreachableError
from orchestrator.clients.generator import GeneratorClient
from orchestrator.clients.ranker import RankerClient
from orchestrator.clients.trainer import TrainerClient, TrainingFailedError

__all__ = [
    "GeneratorClient",
    "RankerClient",
    "ServiceUnreachableError",
    "TrainerClient",
    "TrainingFailedError",
]
