"""Ranker backends and their registry: adding a ranker is one small module.

A backend module defines `build(settings, metrics) -> Ranker` (see `base.Ranker`; pointwise
scorers subclass `base.PointwiseRanker` and implement one method). Register it below under a short
name, or skip the registry and pass its import path: `--backend mypackage.my_ranker:build`.
A scoring function needs no module at all: `--backend scorer --model mypackage.scores:my_score`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BACKENDS", "build_ranker", "load_object"]

# name -> factory import path; imported only when chosen, so a scorer never loads torch.
BACKENDS: dict[str, str] = {
    "pairrm": "services.ranker.rankers.pairrm:build",
    "reward-model": "services.ranker.rankers.reward_model:build",
    "scorer": "services.ranker.rankers.function_scorer:build",
}


def load_object(path: str) -> Any:
    """The object named by `package.module:attribute`, with an error that says what is wrong."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{path!r} is not an import path of the form package.module:name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} (from {path!r}): {exc}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from None


def build_ranker(settings: Any, metrics: Any) -> Any:
    """Load the backend `settings.backend` names (a registered name or a factory import path)."""
    from services.ranker.rankers.base import Ranker

    target = BACKENDS.get(settings.backend, settings.backend)
    if ":" not in target:
        raise ValueError(
            f"unknown backend {settings.backend!r}: choose one of {sorted(BACKENDS)} "
            "or give a factory as package.module:function"
        )
    ranker = load_object(target)(settings, metrics)
    if not isinstance(ranker, Ranker):
        raise TypeError(f"{target} returned {type(ranker).__name__}, which is not a Ranker")
    return ranker
