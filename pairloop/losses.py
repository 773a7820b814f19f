"""The preference losses a training job may ask for, by name: TRL's, plus SimPO and soft SPPO.

Shared by the job schema (validation), the orchestrator (`pairloop plan` counts no reference
model for a reference-free loss) and the trainer (which implements them); it imports nothing heavy.

    TRL_LOSSES          DPOConfig.loss_type's names in TRL 1.16 (computed by TRL's DPOTrainer)
    PAIRLOOP_LOSSES     simpo: SimPO (Meng et al. 2024), reference-free, length-normalised, margin
                        `simpo_gamma`; sppo: SPPO (Wu et al. 2024), the soft loss on the ranker's
                        win probabilities (columns chosen_win_prob / rejected_win_prob)
    REFERENCE_FREE      losses that need no reference model: no reference is loaded for them

Several names in one list are summed, each times its `loss_weights` entry (TRL's rule).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ACCEPTED_LOSSES",
    "PAIRLOOP_LOSSES",
    "PROBABILITY_COLUMNS",
    "REFERENCE_FREE",
    "TRL_LOSSES",
    "check_loss_types",
    "needs_reference",
    "needs_win_probabilities",
]

# DPOConfig.loss_type's help in TRL 1.16 lists exactly these (tests/pairloop/test_losses.py
# checks the list against the installed TRL).
TRL_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
PAIRLOOP_LOSSES = ("simpo", "sppo")
ACCEPTED_LOSSES = TRL_LOSSES + PAIRLOOP_LOSSES
REFERENCE_FREE = frozenset({"simpo"})
# The dataset columns SPPO reads: each response's estimated probability of beating the other
# samples of its prompt (the ranker's win probabilities, `pairloop.preference_data`).
PROBABILITY_COLUMNS = ("chosen_win_prob", "rejected_win_prob")


def check_loss_types(names: Sequence[str]) -> list[str]:
    """`names` as a list, or ValueError naming the unknown ones and every accepted name."""
    names = list(names)
    if not names:
        raise ValueError(f"loss_type is empty; give one or more of {', '.join(ACCEPTED_LOSSES)}")
    unknown = [n for n in names if n not in ACCEPTED_LOSSES]
    if unknown:
        raise ValueError(
            f"unknown loss_type {', '.join(map(repr, unknown))}; accepted: "
            + ", ".join(ACCEPTED_LOSSES)
        )
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type {names} names a loss twice; weight it in loss_weights")
    free = [n for n in names if n in REFERENCE_FREE]
    if free and len(free) != len(names):
        # A reference-free loss loads no reference, which the others need.
        raise ValueError(
            f"loss_type {names}: {', '.join(free)} is reference-free and combines with no "
            "loss that needs a reference model; train it alone"
        )
    return names


def needs_reference(names: Sequence[str]) -> bool:
    """False when every loss is reference-free: no reference model is loaded at all."""
    return not all(n in REFERENCE_FREE for n in names)


def needs_win_probabilities(names: Sequence[str]) -> bool:
    """True when a loss reads the ranker's win probabilities from the dataset (SPPO)."""
    return "sppo" in names
