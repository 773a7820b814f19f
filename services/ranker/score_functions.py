"""Programmatic scoring functions shipped with pairloop: deterministic, documented preferences.

    python -m services.ranker --backend scorer --model services.ranker.score_functions:concise_and_on_topic
    python -m services.ranker --backend scorer --model services.ranker.score_functions:length_target

Each is `f(prompt, candidate) -> float`, higher is better, pure Python and deterministic, so a
loop aligned with it has a known target: the demo can check that the policy moved towards it.

`concise_and_on_topic` encodes "answer the question that was asked, briefly":
    score = 2 * coverage - max(0, log2((words + 1) / (TARGET_WORDS + 1)))
where `coverage` is the share of the prompt's content words (lower-cased, 3+ characters, not stop
words) that the response uses, and `words` the response's word count. Up to TARGET_WORDS (50) words
length costs nothing; each doubling beyond costs 1, as much as missing half of the prompt's words.
An on-topic answer of any length up to 50 words scores 2; an off-topic one scores 0 or less.

`length_target` prefers responses of TARGET_WORDS words, nothing else (shorter or longer alike):
    score = -|log2((words + 1) / (TARGET_WORDS + 1))|

`plain_prose` prefers text made of lowercase letters and spaces (no capitals, digits or symbols):
    score = PROSE_SCALE * (lowercase letters and spaces) / (characters)
It is independent of length, and a policy can learn it from token frequencies alone, which is why
`pairloop demo` aligns its 0.2M-parameter model toward it. The scale (10) makes the judge's
pairwise probability sigmoid(score_a - score_b) move visibly: 10 points of share -> 0.73.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "PROSE_SCALE",
    "STOP_WORDS",
    "TARGET_WORDS",
    "concise_and_on_topic",
    "length_target",
    "plain_prose",
    "words",
]

TARGET_WORDS = 50
PROSE_SCALE = 10.0

_STOP_WORDS = (
    "the and for are but not you all any can her was one our out has have had him his how its "
    "let may now own say she too use who why what when where which will with this that from they "
    "them then than there these those into your about would could should please give tell write "
    "explain describe make some more most also just very"
)
STOP_WORDS = frozenset(_STOP_WORDS.split())

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words (runs of letters and digits)."""
    return _WORD.findall(text.lower())


def _log_length_ratio(n_words: int) -> float:
    """log2 of the length relative to TARGET_WORDS: +1 per doubling, -1 per halving."""
    return math.log2((n_words + 1) / (TARGET_WORDS + 1))


def length_target(prompt: str, candidate: str) -> float:
    """Closeness of the response's length to TARGET_WORDS words, on a log scale (0 is best)."""
    return -abs(_log_length_ratio(len(words(candidate))))


def concise_and_on_topic(prompt: str, candidate: str) -> float:
    """Uses the prompt's content words, at most TARGET_WORDS words long (see module docstring)."""
    content = {w for w in words(prompt) if len(w) >= 3 and w not in STOP_WORDS}
    response = words(candidate)
    coverage = len(content & set(response)) / len(content) if content else 1.0
    return 2.0 * coverage - max(0.0, _log_length_ratio(len(response)))


def plain_prose(prompt: str, candidate: str) -> float:
    """Share of the response's characters that are lowercase ASCII letters or spaces, times 10."""
    if not candidate:
        return 0.0
    plain = sum(1 for ch in candidate if ch == " " or "a" <= ch <= "z")
    return PROSE_SCALE * plain / len(candidate)
