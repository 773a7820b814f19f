"""From ranked responses to preference pairs: chosen = best, rejected = worst, ties dropped.

`best_vs_worst` is the Snorkel recipe. `length_penalised` subtracts `length_penalty` per 100
characters before choosing, a cheap counter to the length bias that PairRM-judged DPO is known for.
Responses that are empty after stripping are not sent to the ranker (it rejects empty text) and do
not take part in a pair; a prompt left with fewer than two ranked responses is dropped and counted,
and so is one the generator could not answer (an `error` entry, no responses).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import PairsConfig
from orchestrator.records import RankedRecord
from pairloop.contracts.ranker import best_and_worst
from pairloop.preference_data import make_preference_row

__all__ = ["PairStats", "build_pairs", "is_test_prompt"]


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    ties_dropped: int = 0
    too_few_responses: int = 0
    generation_errors: int = 0
    empty_responses: int = 0
    bubble_pairs: int = 0  # ordered by a bubble pass: best and worst known, no scores
    chosen_scores: list[float] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)
    chosen_lengths: list[int] = field(default_factory=list)
    rejected_lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        """The stage's figures: counts, and mean scores and lengths of chosen and rejected."""

        def mean(xs: list[float] | list[int]) -> float:
            return float(sum(xs) / len(xs)) if xs else 0.0

        def mean_score(xs: list[float]) -> float | None:
            return float(sum(xs) / len(xs)) if xs else None  # bubble mode: no scores at all

        return {
            "prompts": self.prompts,
            "pairs": self.pairs,
            "ties_dropped": self.ties_dropped,
            "too_few_responses": self.too_few_responses,
            "generation_errors": self.generation_errors,
            "empty_responses": self.empty_responses,
            "bubble_pairs": self.bubble_pairs,
            "mean_chosen_score": mean_score(self.chosen_scores),
            "mean_rejected_score": mean_score(self.rejected_scores),
            "mean_chosen_length": mean(self.chosen_lengths),
            "mean_rejected_length": mean(self.rejected_lengths),
        }


def is_test_prompt(prompt_id: str, fraction: float) -> bool:
    """Deterministic split by prompt id: the same prompt is always on the same side."""
    if fraction <= 0:
        return False
    digest = int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def _choose(
    scores: list[float] | None, best: int, worst: int, lengths: list[int], cfg: PairsConfig
) -> tuple[int, int, float | None, float | None] | None:
    """(chosen, rejected, chosen score, rejected score), or None for a tie; the scores are None
    in bubble mode, where the ranker only knows best and worst (ranks, not scores)."""
    if scores is None:
        return None if best == worst else (best, worst, None, None)
    adjusted = list(scores)
    if cfg.rule == "length_penalised":
        adjusted = [
            s - cfg.length_penalty * n / 100.0 for s, n in zip(scores, lengths, strict=True)
        ]
    hi, lo = best_and_worst(adjusted)
    if adjusted[hi] - adjusted[lo] <= cfg.min_margin or hi == lo:
        return None
    return hi, lo, scores[hi], scores[lo]


def build_pairs(
    records: Iterable[RankedRecord], cfg: PairsConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], PairStats]:
    """Ranked records -> (train rows, test rows, stats); rows in the published dataset format."""
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    stats = PairStats()
    for rec in records:
        stats.prompts += 1
        stats.empty_responses += rec.empty
        if rec.error:  # the generator answered this prompt with an error entry
            stats.generation_errors += 1
            continue
        candidates = rec.candidates
        if len(candidates) < 2:
            stats.too_few_responses += 1
            continue
        lengths = [len(c) for c in candidates]
        choice = _choose(rec.scores, rec.best_index, rec.worst_index, lengths, cfg)
        if choice is None:
            stats.ties_dropped += 1
            continue
        chosen, rejected, chosen_score, rejected_score = choice
        row = make_preference_row(
            prompt_id=rec.prompt_id,
            prompt=rec.prompt,
            responses=candidates,
            scores=rec.scores or [],
            win_probs=rec.win_probs,
            chosen_index=chosen,
            rejected_index=rejected,
        )
        stats.pairs += 1
        if chosen_score is None or rejected_score is None:
            stats.bubble_pairs += 1
        else:
            stats.chosen_scores.append(chosen_score)
            stats.rejected_scores.append(rejected_score)
        stats.chosen_lengths.append(lengths[chosen])
        stats.rejected_lengths.append(lengths[rejected])
        (test if is_test_prompt(rec.prompt_id, cfg.test_fraction) else train).append(row)
    return train, test, stats
