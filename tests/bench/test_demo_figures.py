"""The README's demo figures are what `python -m bench.demo_figures` measured, not hand-copied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.demo_figures import README, RESULTS, readme_block, render, update_readme


def test_the_readme_block_is_the_rendering_of_the_measured_figures() -> None:
    figures = json.loads(RESULTS.read_text())
    assert readme_block(README.read_text()) == render(figures)
    # The block states every measured win rate.
    for win in figures["win_rate_vs_base"]:
        assert f"{win:.3f}" in readme_block(README.read_text())


def test_update_rewrites_only_the_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-figures:begin -->\nold\n<!-- demo-figures:end -->\nrest\n")
    figures = {
        "command": "c",
        "date": "2026-12-02",
        "cpus": 2,
        "seconds": 300,
        "eval_prompts": 64,
        "win_rate_vs_base": [0.6, 0.7],
        "lc_win_rate_vs_base": 0.65,
        "best_of_n": 4,
        "best_of_vs_base": [0.55, 0.66, 0.77],
        "swap_seconds": [0.05, 0.1],
    }
    update_readme(figures, readme)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- demo-figures:begin -->\n") and text.endswith("rest\n")
    block = readme_block(text)
    assert "0.600 after 1, **0.700** after 2" in block and "best-of-4 of policies 0-2" in block
    with pytest.raises(ValueError, match="demo-figures"):
        readme_block("no markers")
