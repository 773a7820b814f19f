"""What a ranker backend is: the `Ranker` protocol the routes call, and the shared arithmetic.

Two shapes of backend exist:
  - pairwise (PairRM): a model that compares two candidates; implements `Ranker` directly;
  - pointwise (reward models, programmatic scorers): a score per (prompt, candidate); subclass
    `PointwiseRanker` and implement `score_item`, and ranking, comparing and selecting follow.

Conventions every backend keeps: higher score is better; ranks are 1-based with ties sharing the
better rank (llm-blender's `get_ranks_from_scores`); best/worst are the first highest / first lowest
scores (`pairloop.contracts.ranker.best_and_worst`); `tie` is true when best and worst are the same
candidate, so the item gives no pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from pairloop.contracts.ranker import (
    CompareItem,
    CompareResult,
    RankItem,
    RankMode,
    RankResult,
    SelectResult,
    Truncation,
    best_and_worst,
)

__all__ = [
    "Pick",
    "PointwiseRanker",
    "Ranker",
    "compare_from_scores",
    "rank_from_scores",
    "ranks_from_scores",
    "sigmoid",
    "win_probs_from_logits",
    "win_probs_from_scores",
]

Pick = Literal["best", "worst"]


@runtime_checkable
class Ranker(Protocol):
    """A ranking backend, as the routes see it. `request` identifies the HTTP request (metrics)."""

    backend: str
    model: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    async def rank(
        self, items: Sequence[RankItem], *, mode: RankMode, request: int
    ) -> list[RankResult]: ...

    async def compare(
        self, items: Sequence[CompareItem], *, request: int
    ) -> list[CompareResult]: ...

    async def select(
        self, items: Sequence[RankItem], *, pick: Pick, mode: RankMode, request: int
    ) -> list[SelectResult]: ...


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def win_probs_from_logits(logits: Sequence[Sequence[float]]) -> list[float]:
    """Each candidate's mean probability of beating the others: mean over j != i of
    sigmoid(logits[i][j]), where logits[i][j] is the log-odds that i beats j."""
    n = len(logits)
    if n < 2:
        raise ValueError("win probabilities need at least two candidates")
    return [
        sum(sigmoid(float(logits[i][j])) for j in range(n) if j != i) / (n - 1) for i in range(n)
    ]


def win_probs_from_scores(scores: Sequence[float]) -> list[float]:
    """Bradley-Terry from pointwise scores: P(i beats j) = sigmoid(score_i - score_j)."""
    return win_probs_from_logits([[float(a) - float(b) for b in scores] for a in scores])


def ranks_from_scores(scores: Sequence[float]) -> list[int]:
    """1-based ranks, ties sharing the better rank: llm-blender's `get_ranks_from_scores`."""
    ordered = sorted(scores, reverse=True)
    return [ordered.index(s) + 1 for s in scores]


def rank_from_scores(
    scores: Sequence[float], truncated: Truncation, win_probs: Sequence[float] | None = None
) -> RankResult:
    """The full verdict from scores; win probabilities default to Bradley-Terry on the scores."""
    values = [float(s) for s in scores]
    best, worst = best_and_worst(values)
    probs = list(win_probs) if win_probs is not None else win_probs_from_scores(values)
    return RankResult(
        scores=values,
        ranks=ranks_from_scores(values),
        win_probs=[float(p) for p in probs],
        best_index=best,
        worst_index=worst,
        tie=best == worst,
        truncated=truncated,
    )


def compare_from_scores(score_a: float, score_b: float, truncated: Truncation) -> CompareResult:
    """A pointwise backend's comparison: logit = score_a - score_b, probability = sigmoid(logit)."""
    logit = float(score_a) - float(score_b)
    return CompareResult(prob_a_beats_b=sigmoid(logit), logit=logit, truncated=truncated)


class PointwiseRanker:
    """Base of backends that score each (prompt, candidate) on its own.

    Bubble mode means nothing for them (scores are transitive, every candidate is scored once
    anyway), so both modes return full scores and ranks.
    """

    backend = "pointwise"
    model = ""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @property
    def ready(self) -> bool:
        return True

    async def score_items(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *, request: int
    ) -> list[tuple[list[float], Truncation]]:
        """Scores (higher is better) and truncation flags for each prompt's candidates."""
        raise NotImplementedError

    async def rank(
        self, items: Sequence[RankItem], *, mode: RankMode, request: int
    ) -> list[RankResult]:
        scored = await self.score_items(
            [i.prompt for i in items], [i.candidates for i in items], request=request
        )
        return [rank_from_scores(scores, trunc) for scores, trunc in scored]

    async def compare(self, items: Sequence[CompareItem], *, request: int) -> list[CompareResult]:
        scored = await self.score_items(
            [i.prompt for i in items], [[i.a, i.b] for i in items], request=request
        )
        return [compare_from_scores(s[0], s[1], trunc) for s, trunc in scored]

    async def select(
        self, items: Sequence[RankItem], *, pick: Pick, mode: RankMode, request: int
    ) -> list[SelectResult]:
        ranked = await self.rank(items, mode=mode, request=request)
        return [
            select_from_rank(item, result, pick) for item, result in zip(items, ranked, strict=True)
        ]


def select_from_rank(item: RankItem, result: RankResult, pick: Pick) -> SelectResult:
    index = result.best_index if pick == "best" else result.worst_index
    score = result.scores[index] if result.scores is not None else None
    return SelectResult(
        index=index, candidate=item.candidates[index], score=score, truncated=result.truncated
    )
