"""Evaluation figures: judge-decided win rates, lengths, and AlpacaEval's length-controlled win rate.

The judge (a ranker service) gives, per evaluation instruction, the probability that the policy's
answer beats the reference's (both orders averaged). The win rate is the mean of those
probabilities, AlpacaEval's convention for soft preferences. The same judgments are written as
AlpacaEval annotations (`preference` = 1 + P(policy wins)), from which the length-controlled win
rate is fitted by AlpacaEval's own GLM (orchestrator/lc_winrate.py): length bias is the recipe's
known weakness (AlpacaEval 2.0 LC 26.4 vs 30.2 raw for Snorkel-Mistral-PairRM-DPO).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from orchestrator.lc_winrate import GLM, length_controlled

__all__ = ["WinRate", "alpaca_annotations", "win_rate"]


@dataclass(frozen=True)
class WinRate:
    """One policy against one reference on the same instructions (rates in [0, 1])."""

    win_rate: float
    hard_win_rate: float
    lc_win_rate: float | None
    lc_standard_error: float | None
    lc_length_coef: float | None
    lc_glm: str
    lc_note: str | None
    mean_length: float
    mean_reference_length: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def alpaca_annotations(
    *,
    prompts: Sequence[dict[str, Any]],
    outputs: Sequence[str],
    reference_outputs: Sequence[str],
    probs: Sequence[float],
    generator: str,
    reference_generator: str,
    judge: str,
) -> list[dict[str, Any]]:
    """AlpacaEval annotations: output_1 is the reference's, output_2 the policy's."""
    rows = []
    for p, out, ref, prob in zip(prompts, outputs, reference_outputs, probs, strict=True):
        row: dict[str, Any] = {
            "instruction": p["prompt"],
            "output_1": ref,
            "generator_1": reference_generator,
            "output_2": out,
            "generator_2": generator,
            "preference": 1.0 + float(prob),
            "annotator": judge,
        }
        if "index" in p:
            row["index"] = int(p["index"])
        rows.append(row)
    return rows


def win_rate(annotated: Sequence[dict[str, Any]], *, glm: GLM | None = None) -> WinRate:
    """Win rate figures of `generator_2` over `generator_1` from AlpacaEval annotations; the LC
    GLM is `glm`, or the one `lc_winrate.choose_glm` picks for these annotations' judge."""
    if not annotated:
        raise ValueError("win_rate needs at least one annotation")
    probs = np.asarray([a["preference"] - 1.0 for a in annotated], dtype=float)
    lc = length_controlled(annotated, glm=glm)
    hard = np.where(probs > 0.5, 1.0, np.where(probs == 0.5, 0.5, 0.0))
    return WinRate(
        win_rate=float(probs.mean()),
        hard_win_rate=float(hard.mean()),
        lc_win_rate=lc.win_rate,
        lc_standard_error=lc.standard_error,
        lc_length_coef=lc.length_coef,
        lc_glm=lc.glm,
        lc_note=lc.note,
        mean_length=float(np.mean([len(a["output_2"]) for a in annotated])),
        mean_reference_length=float(np.mean([len(a["output_1"]) for a in annotated])),
        n=len(annotated),
    )
