"""Programmatic-scorer backend: a plain Python function is the ranker.

    python -m services.ranker --backend scorer --model services.ranker.score_functions:concise_and_on_topic

`--model` names the function as `package.module:function`; it takes `(prompt, candidate)` and
returns a float, higher is better. It must be deterministic (the loop's pairs must be reproducible)
and should be quick: calls run on a worker thread, one request's candidates at a time. This is the
recipe's premise made concrete: a specialised ranker is one function.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence

from pairloop.contracts.ranker import Truncation
from pairloop.errors import ServerError
from services.ranker.metrics import RankerMetrics
from services.ranker.rankers import load_object
from services.ranker.rankers.base import PointwiseRanker
from services.ranker.settings import RankerSettings

__all__ = ["ScorerRanker", "build"]

ScoreFn = Callable[[str, str], float]


class ScorerRanker(PointwiseRanker):
    """`Ranker` over a scoring function `(prompt, candidate) -> float`."""

    backend = "scorer"

    def __init__(self, fn: ScoreFn, *, name: str, metrics: RankerMetrics) -> None:
        self.fn = fn
        self.model = name
        self._metrics = metrics

    def _score_all(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        out = []
        for prompt, cands in zip(prompts, candidates, strict=True):
            scores = []
            for cand in cands:
                value = self.fn(prompt, cand)
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ServerError(
                        f"scorer {self.model} returned {type(value).__name__}, not a float"
                    )
                if not math.isfinite(value):
                    raise ServerError(f"scorer {self.model} returned {value}, not a finite float")
                scores.append(float(value))
            out.append(scores)
        return out

    async def score_items(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *, request: int
    ) -> list[tuple[list[float], Truncation]]:
        scored = await asyncio.to_thread(self._score_all, prompts, candidates)
        self._metrics.comparisons.labels(**self._metrics.labels).inc(
            sum(len(c) for c in candidates)
        )
        return [(s, Truncation(candidates=[False] * len(s))) for s in scored]


def build(settings: RankerSettings, metrics: RankerMetrics) -> ScorerRanker:
    fn = load_object(settings.model)
    if not callable(fn):
        raise ValueError(
            f"{settings.model} is not callable; expected f(prompt, candidate) -> float"
        )
    return ScorerRanker(fn, name=settings.model, metrics=metrics)
