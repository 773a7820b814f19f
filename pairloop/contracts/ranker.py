"""HTTP contract of the ranker service, shared by the server and its clients.

    POST /v1/rank     items of {prompt, candidates[]} -> score and rank per candidate, best/worst index
    POST /v1/compare  items of {prompt, a, b}          -> probability that a beats b (both orders averaged)
    POST /v1/select   items of {prompt, candidates[]}  -> the best (or worst) candidate's index

Scores are the backend's: for PairRM (full mode) the same numbers as llm-blender's
`Blender.rank(..., return_scores=True)`; higher is better. Ranks are 1-based, 1 = best, ties share
the better rank. `best_index` / `worst_index` are the first highest / lowest scores; `tie` is true
when they are the same candidate (all scores equal, or bubble mode found no order), so the item
yields no chosen/rejected pair. Caps on items and candidates depend on deployment and are enforced
by the server (HTTP 400 naming the cap).

Win probabilities (full mode): `win_probs[i]` is the mean over j != i of P(i beats j), with P as
in compare below (PairRM) or Bradley-Terry on the scores (pointwise backends). SPPO trains on them.

Compare: `logit` is the comparison's log-odds averaged over both orders (PairRM: the mean of
L(a, b) and -L(b, a), half of llm-blender's `compare(..., return_logits=True)`; pointwise backends:
score_a - score_b), and `prob_a_beats_b = sigmoid(logit)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CompareItem",
    "CompareRequest",
    "CompareResponse",
    "CompareResult",
    "RankItem",
    "RankMode",
    "RankRequest",
    "RankResponse",
    "RankResult",
    "SelectRequest",
    "SelectResponse",
    "SelectResult",
    "Truncation",
    "best_and_worst",
]

RankMode = Literal["full", "bubble"]


def best_and_worst(scores: Sequence[float]) -> tuple[int, int]:
    """(best, worst): the index of the first highest and of the first lowest score.

    The contract's tie-break, kept by every ranker backend for `best_index`/`worst_index` and by
    the orchestrator's pair rules when they re-score (a length penalty): equal scores resolve to
    the earliest candidate, so the same scores always give the same pair.
    """
    if not scores:
        raise ValueError("best_and_worst needs at least one score")
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, worst


def _non_blank(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


class RankItem(BaseModel):
    """One prompt and the responses to rank for it."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    candidates: list[str] = Field(min_length=2)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _non_blank(v, "prompt")

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[str]) -> list[str]:
        for i, c in enumerate(v):
            _non_blank(c, f"candidate {i}")
        return v


class Truncation(BaseModel):
    """Which inputs were cut to the model's limits (PairRM: source 1224 tokens, candidate 412 plus
    half of what the prompt left unused of its 1224, as llm-blender's collator does)."""

    prompt: bool = False
    candidates: list[bool] = Field(default_factory=list)

    @property
    def any(self) -> bool:
        return self.prompt or any(self.candidates)


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[RankItem] = Field(min_length=1)
    mode: RankMode = Field(
        "full", description="full: n(n-1) comparisons, both orders; bubble: n-1, best/worst only"
    )


class RankResult(BaseModel):
    scores: list[float] | None = Field(
        description="per candidate, higher is better; None in PairRM's bubble mode"
    )
    ranks: list[int] | None = Field(description="1 = best; None in PairRM's bubble mode")
    win_probs: list[float] | None = Field(
        None,
        description="per candidate, its estimated probability of beating the other candidates: "
        "the mean over the others of P(i beats j). PairRM (full mode): P = sigmoid of the "
        "comparison's log-odds averaged over both orders, as /v1/compare; pointwise backends: "
        "Bradley-Terry, sigmoid(score_i - score_j). None in PairRM's bubble mode",
    )
    best_index: int
    worst_index: int
    tie: bool = Field(
        False, description="best and worst are the same candidate: no chosen/rejected pair"
    )
    truncated: Truncation


class RankResponse(BaseModel):
    model: str
    backend: str
    mode: RankMode
    results: list[RankResult]


class CompareItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    a: str
    b: str

    @field_validator("prompt", "a", "b")
    @classmethod
    def _text(cls, v: str) -> str:
        return _non_blank(v, "prompt, a and b")


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[CompareItem] = Field(min_length=1)


class CompareResult(BaseModel):
    prob_a_beats_b: float = Field(ge=0.0, le=1.0, description="sigmoid(logit)")
    logit: float | None = Field(
        None, description="log-odds that a beats b, averaged over both orders"
    )
    truncated: Truncation


class CompareResponse(BaseModel):
    model: str
    backend: str
    results: list[CompareResult]


class SelectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[RankItem] = Field(min_length=1)
    pick: Literal["best", "worst"] = "best"
    mode: RankMode = Field("full", description="bubble is cheaper (n-1 comparisons), full is exact")


class SelectResult(BaseModel):
    index: int
    candidate: str
    score: float | None = Field(None, description="its score; None in PairRM's bubble mode")
    truncated: Truncation


class SelectResponse(BaseModel):
    model: str
    backend: str
    pick: Literal["best", "worst"]
    results: list[SelectResult]
