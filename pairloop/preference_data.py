"""The preference dataset format pairloop writes and trains on: Snorkel-Mistral-PairRM-DPO's columns.

    prompt_id, prompt, chosen, rejected, all_generated_responses, all_rm_scores,
    all_win_probs, chosen_win_prob, rejected_win_prob

`chosen` / `rejected` are message lists `[{role: user, content: prompt}, {role: assistant, ...}]`,
as in `HuggingFaceH4/ultrafeedback_binarized` and Snorkel's dataset. The last three columns are
pairloop's: each response's probability of beating the prompt's other responses, by the ranker
(full mode; empty / null in bubble mode). SPPO trains on them; users can filter pairs on them. A dataset directory holds one
JSONL file per split (`train_iteration_{k}`, `test_iteration_{k}`) and a README.md whose `configs`
block names them. File names carry a content hash: `datasets` caches local files by path and
modification time, so rewriting a split under the same name within a second served stale rows.
With the card pointing at the new name, so `datasets.load_dataset(DIR, split="train_iteration_1")` reads it like a hub
dataset and the alignment-handbook recipes can point at it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, model_validator

from pairloop.atomic import atomic_write_text
from pairloop.contracts.generator import ChatMessage

__all__ = [
    "PREFERENCE_COLUMNS",
    "PreferenceRow",
    "load_rows",
    "make_preference_row",
    "read_split_names",
    "split_path",
    "write_preference_split",
]

PREFERENCE_COLUMNS = (
    "prompt_id",
    "prompt",
    "chosen",
    "rejected",
    "all_generated_responses",
    "all_rm_scores",
    "all_win_probs",
    "chosen_win_prob",
    "rejected_win_prob",
)
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class PreferenceRow(BaseModel):
    """One prompt's pair, with every response and score kept for analysis."""

    prompt_id: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    chosen: list[ChatMessage] = Field(min_length=2)
    rejected: list[ChatMessage] = Field(min_length=2)
    all_generated_responses: list[str]
    all_rm_scores: list[float]
    all_win_probs: list[float] = Field(default_factory=list)
    chosen_win_prob: float | None = Field(None, ge=0.0, le=1.0)
    rejected_win_prob: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> PreferenceRow:
        # Empty scores are allowed: bubble-mode ranking finds best and worst without scoring all.
        if self.all_rm_scores and len(self.all_generated_responses) != len(self.all_rm_scores):
            raise ValueError("all_generated_responses and all_rm_scores differ in length")
        if self.all_win_probs and len(self.all_generated_responses) != len(self.all_win_probs):
            raise ValueError("all_generated_responses and all_win_probs differ in length")
        for name in ("chosen", "rejected"):
            msgs = getattr(self, name)
            if msgs[-1].role != "assistant":
                raise ValueError(f"{name} must end with an assistant message")
        return self


def make_preference_row(
    *,
    prompt_id: str,
    prompt: str,
    responses: Sequence[str],
    scores: Sequence[float],
    chosen_index: int,
    rejected_index: int,
    win_probs: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Build one row (as a plain dict) from a prompt, its responses, their scores (and win
    probabilities, where the ranker gave them) and the pair."""

    def convo(response: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    row = PreferenceRow(
        prompt_id=prompt_id,
        prompt=prompt,
        chosen=convo(responses[chosen_index]),
        rejected=convo(responses[rejected_index]),
        all_generated_responses=list(responses),
        all_rm_scores=[float(s) for s in scores],
        all_win_probs=[float(p) for p in win_probs or []],
        chosen_win_prob=win_probs[chosen_index] if win_probs else None,
        rejected_win_prob=win_probs[rejected_index] if win_probs else None,
    )
    return row.model_dump()


def _card_path(root: Path) -> Path:
    return root / "README.md"


def _read_card_files(root: Path) -> dict[str, str]:
    card = _card_path(root)
    if not card.is_file():
        return {}
    text = card.read_text()
    if not text.startswith("---"):
        return {}
    meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    return {
        entry["split"]: entry["path"]
        for cfg in meta.get("configs", [])
        for entry in cfg.get("data_files", [])
    }


def read_split_names(root: str | Path) -> list[str]:
    """Splits declared in the dataset card's `configs` block (empty if there is no card)."""
    return sorted(_read_card_files(Path(root)))


def split_path(root: str | Path, split: str) -> Path:
    """The JSONL file that holds `split` (KeyError if the dataset has no such split)."""
    files = _read_card_files(Path(root))
    if split not in files:
        raise KeyError(f"dataset {root} has no split {split!r}; it has {sorted(files)}")
    return Path(root) / files[split]


def _write_card(root: Path, files: Mapping[str, str]) -> None:
    meta = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": files[s]} for s in sorted(files)],
            }
        ]
    }
    body = (
        "# pairloop preference data\n\n"
        "Columns: " + ", ".join(PREFERENCE_COLUMNS) + ".\n"
        'Load with `datasets.load_dataset(<this dir>, split="train_iteration_1")`.\n'
    )
    atomic_write_text(
        _card_path(root), "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body
    )


def write_preference_split(root: str | Path, split: str, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Validate `rows` and write them as split `split` of the dataset at `root` (atomically).

    Other splits already in the dataset are kept. Returns the split's JSONL path.
    """
    if not _SPLIT_NAME.match(split):
        raise ValueError(f"split name {split!r} must be letters, digits and underscores")
    base = Path(root)
    lines = [PreferenceRow.model_validate(dict(r)).model_dump_json() for r in rows]
    if not lines:
        raise ValueError(f"split {split!r} has no rows")
    text = "\n".join(lines) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    rel = f"data/{split}-{digest}.jsonl"
    atomic_write_text(base / rel, text)
    files = _read_card_files(base)
    previous = files.get(split)
    files[split] = rel
    _write_card(base, files)
    if previous and previous != rel:
        (base / previous).unlink(missing_ok=True)
    return base / rel


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL split file back as dicts (for tools that do not need `datasets`)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
