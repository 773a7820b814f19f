"""pairloop's benchmarks: `python -m bench [NAME ...]`; each writes bench/results/NAME[_TAG].json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, tag: str, result: dict[str, Any]) -> Path:
    """Write `result` as bench/results/NAME[_TAG].json; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}{'_' + tag if tag else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
