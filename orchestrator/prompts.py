"""Prompt sources and their seeded, disjoint slices: held-out evaluation prompts, then one fresh
slice per iteration, fixed once when a run is created (a resumed run reads the same slices).

Sources: a Hugging Face dataset (default `HuggingFaceH4/ultrafeedback_binarized`, split
`train_prefs`, column `prompt`) or a local JSONL/JSON/Parquet file. Prompts are de-duplicated by
text before slicing, so one instruction never lands in two slices; empty or whitespace-only
prompts are dropped. Both are counted (`PromptPool`). Which prompts fit the models is decided by
`orchestrator.admission`, which walks the seeded order (`shuffled`) and cuts the slices.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, EvalPromptsConfig, PromptsConfig
from pairloop.atomic import atomic_write_text

__all__ = [
    "PromptPool",
    "PromptRecord",
    "cut_slices",
    "exclude_instructions",
    "load_eval_prompts",
    "load_prompt_source",
    "needed",
    "normalise_instruction",
    "read_prompts",
    "shuffled",
    "slice_prompts",
    "write_prompts",
]

PromptRecord = dict[str, str]  # {"prompt_id": ..., "prompt": ...}


@dataclass
class PromptPool:
    """A source's distinct, non-empty prompts in source order, and what was dropped on the way."""

    records: list[PromptRecord] = field(default_factory=list)
    rows: int = 0
    empty: int = 0
    duplicates: int = 0


_LOCAL = {".jsonl", ".json", ".parquet"}


def _rows_from_local(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ConfigError(f"prompts.source: {path} must hold a JSON list of objects")
        return data
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def _rows_from_hub(name: str, split: str, config: str | None = None) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError, ConnectionError) as exc:
        raise ConfigError(
            f"prompts.source: cannot load dataset {name!r} split {split!r} ({exc}); "
            "point prompts.source at a local .jsonl/.parquet file when the hub is out of reach"
        ) from None
    rows: list[dict[str, Any]] = ds.to_list()
    return rows


def load_prompt_source(cfg: PromptsConfig) -> PromptPool:
    """All usable prompts of the source, de-duplicated, in source order, with the counts."""
    path = Path(cfg.source)
    rows = (
        _rows_from_local(path) if path.suffix in _LOCAL else _rows_from_hub(cfg.source, cfg.split)
    )
    pool = PromptPool(rows=len(rows))
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if cfg.field not in row:
            raise ConfigError(f"prompts.field: row {i} of {cfg.source} has no column {cfg.field!r}")
        text = row[cfg.field]
        if not isinstance(text, str) or not text.strip():
            pool.empty += 1
            continue
        # Compared normalised, so one instruction spelled twice never lands in two slices.
        if normalise_instruction(text) in seen:
            pool.duplicates += 1
            continue
        seen.add(normalise_instruction(text))
        pool.records.append({"prompt_id": prompt_id(row, text, cfg.id_field), "prompt": text})
    return pool


def needed(cfg: PromptsConfig, iterations: int) -> int:
    """Prompts a run takes: the eval slice plus one fresh slice per iteration."""
    return cfg.eval_prompts + cfg.per_iteration * iterations


def shuffled(prompts: list[PromptRecord], seed: int) -> list[PromptRecord]:
    """The seeded order slices are drawn in (a resumed or re-created run draws the same)."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order


def cut_slices(
    ordered: list[PromptRecord], cfg: PromptsConfig, iterations: int
) -> dict[str, list[PromptRecord]]:
    """`{"eval": [...], "iteration_1": [...], ...}` cut from `ordered`, eval first."""
    slices = {"eval": ordered[: cfg.eval_prompts]}
    start = cfg.eval_prompts
    for k in range(1, iterations + 1):
        slices[f"iteration_{k}"] = ordered[start : start + cfg.per_iteration]
        start += cfg.per_iteration
    return slices


def prompt_id(row: Mapping[str, Any], text: str, id_field: str | None) -> str:
    """The row's own id where it has one, else a hash of the text (stable across runs)."""
    if id_field and row.get(id_field) not in (None, ""):
        return str(row[id_field])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def normalise_instruction(text: str) -> str:
    """The form instructions are compared in: case-folded, whitespace runs collapsed, stripped."""
    return " ".join(text.split()).casefold()


def load_eval_prompts(cfg: EvalPromptsConfig) -> list[PromptRecord]:
    """The evaluation's instructions, in source order, de-duplicated; `index` is the source row.

    AlpacaEval's own figures (its length-controlled GLM's per-instruction difficulty) are keyed by
    that row index, and an AlpacaEval-format row's `dataset` is kept for its outputs file.
    """
    path = Path(cfg.source)
    try:
        if path.suffix in _LOCAL:
            rows = _rows_from_local(path)
        else:
            rows = _rows_from_hub(cfg.source, cfg.split, cfg.name)
    except ConfigError as exc:  # the loaders name `prompts.source`; this is the evaluation's
        raise ConfigError(f"evaluation.{exc}") from None
    out: list[PromptRecord] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or cfg.field not in row:
            raise ConfigError(
                f"evaluation.prompts.field: row {i} of {cfg.source} has no column {cfg.field!r}"
            )
        text = row[cfg.field]
        if not isinstance(text, str) or not text.strip() or normalise_instruction(text) in seen:
            continue
        seen.add(normalise_instruction(text))
        record = {"prompt_id": prompt_id(row, text, cfg.id_field), "prompt": text, "index": str(i)}
        if isinstance(row.get("dataset"), str):
            record["dataset"] = row["dataset"]
        out.append(record)
        if cfg.limit is not None and len(out) == cfg.limit:
            break
    if not out:
        raise ConfigError(f"evaluation.prompts: {cfg.source} holds no usable instruction")
    return out


def exclude_instructions(
    pool: list[PromptRecord], instructions: list[PromptRecord]
) -> tuple[list[PromptRecord], int]:
    """`pool` without any prompt whose normalised text is one of `instructions`; and how many went."""
    banned = {normalise_instruction(p["prompt"]) for p in instructions}
    kept = [p for p in pool if normalise_instruction(p["prompt"]) not in banned]
    return kept, len(pool) - len(kept)


def slice_prompts(
    prompts: list[PromptRecord], cfg: PromptsConfig, iterations: int
) -> dict[str, list[PromptRecord]]:
    """Disjoint, seeded slices of `prompts` as they are (no admission: see orchestrator.admission)."""
    need = needed(cfg, iterations)
    if len(prompts) < need:
        raise ConfigError(
            f"prompts: the source has {len(prompts)} distinct prompts but the run needs {need} "
            f"({cfg.eval_prompts} eval + {iterations} x {cfg.per_iteration}); lower "
            "prompts.per_iteration or prompts.eval_prompts, or use a larger source"
        )
    return cut_slices(shuffled(prompts, cfg.seed), cfg, iterations)


def write_prompts(path: str | Path, prompts: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(p, sort_keys=True) + "\n" for p in prompts))


def read_prompts(path: str | Path) -> list[PromptRecord]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
