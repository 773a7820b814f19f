"""The one rule for cutting a prompt that is too long: keep its end.

A long UltraFeedback prompt puts the material first and the question last, so the end is what a
model must see to answer. The trainer (`services/trainer/dpo.py`, prompts above
`dpo.max_prompt_length`) and prompt admission (`prompts.too_long: truncate`) both cut with this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = ["keep_end"]

T = TypeVar("T")


def keep_end(tokens: Sequence[T], limit: int) -> list[T]:
    """The last `limit` tokens of `tokens` (all of them when they fit; none for limit <= 0)."""
    if limit <= 0:
        return []
    return list(tokens[-limit:])
