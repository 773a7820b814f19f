"""The built-in text that the tiny models' tokenizers are trained on (no data file, no download)."""

from __future__ import annotations

__all__ = ["training_corpus"]

_CORPUS_SEED = """
Write a short poem about the sea. Explain how a rainbow forms. Give three tips for learning to cook.
Summarise the plot of a detective story in two sentences. What is the capital of France? Paris.
Translate good morning into Spanish: buenos dias. List the planets of the solar system in order.
Describe a healthy breakfast. Why is the sky blue? Because air scatters blue light more than red.
How do I sort a list in Python? Use sorted(items) or items.sort(). Name a famous painter: Monet.
The quick brown fox jumps over the lazy dog. A helpful assistant answers clearly and kindly.
Please write an email asking for a meeting next week. Thank you for your help, have a nice day!
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # % & *
user assistant system [INST] [/INST] <|user|> <|assistant|> <|system|>
"""


def training_corpus() -> list[str]:
    """The corpus lines, with lower- and upper-case variants."""
    lines = [line.strip() for line in _CORPUS_SEED.strip().splitlines() if line.strip()]
    # Lower- and upper-case variants widen the merges without shipping a data file.
    return lines + [line.lower() for line in lines] + [line.upper() for line in lines]
