"""The one truncation rule: a prompt too long keeps its end (where UltraFeedback puts the question)."""

from __future__ import annotations

from pairloop.truncation import keep_end


def test_keep_end_keeps_the_last_tokens() -> None:
    assert keep_end([1, 2, 3, 4, 5], 2) == [4, 5]
    assert keep_end([1, 2, 3], 5) == [1, 2, 3]
    assert keep_end([1, 2, 3], 0) == []  # not the whole list, as `x[-0:]` would give
