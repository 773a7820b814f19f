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
    "check_unique_ids",
    "cut_slices",
    "describe_not_string",
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
    # Rows whose prompt field holds no text (a list, a number, null), by JSON type name.
    not_string: dict[str, int] = field(default_factory=dict)


_LOCAL = {".jsonl", ".json", ".parquet"}
# What a hub error message says to do instead (every hub failure ends in it).
_LOCAL_ALTERNATIVE = "point {where} at a local .jsonl/.json/.parquet file instead"


def _json_type(value: Any) -> str:
    """A value's type as a JSON file names it (what a user sees in their file)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def describe_not_string(counts: Mapping[str, int]) -> str:
    """`'3 not a string (1 list, 1 null, 1 number)'`: how the skipped non-text rows are named."""
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return f"{sum(counts.values())} not a string ({kinds})"


def _rows_from_jsonl(path: Path, where: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{where}: {path} line {number} is not valid JSON ({exc.msg} at column "
                    f"{exc.colno}); fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{where}: {path} line {number} holds a JSON {_json_type(row)}, not an object "
                    "with a prompt field; every line must be one object"
                )
            rows.append(row)
    return rows


def _rows_from_local(path: Path, where: str = "prompts.source") -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return _rows_from_jsonl(path, where)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}: {path} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                f"{exc.colno})"
            ) from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ConfigError(f"{where}: {path} must hold a JSON list of objects")
        return data
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def _hub_data_file(name: str, config: str | None) -> str | None:
    """The local path of a repo's `{config}.json`, where the repo publishes its data that way.

    AlpacaEval's repo (`tatsu-lab/alpaca_eval`) ships a loading script beside one JSON file per
    config, and `datasets` 5 refuses script repos ("Dataset scripts are no longer supported"):
    the JSON is what the script would read. `hf_hub_download` reads it from the HF cache when
    offline (`HF_HUB_OFFLINE=1`). None: the repo has no such file (load it through `datasets`).
    """
    if not config:
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return str(hf_hub_download(repo_id=name, filename=f"{config}.json", repo_type="dataset"))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        # Not in the repo, or not in the cache offline: `datasets` may still know the dataset.
        return None


def _rows_from_hub(
    name: str, split: str, config: str | None, columns: list[str], where: str
) -> list[dict[str, Any]]:
    """The rows of a hub dataset, only `columns` of them (UltraFeedback rows carry every response).

    Any failure, whatever raised it (`datasets`, `huggingface_hub`, the network), becomes one
    ConfigError line that names the dataset and the local-file alternative.
    """
    try:
        data_file = _hub_data_file(name, config)
        if data_file is not None:
            rows = _rows_from_local(Path(data_file), where)
            return [{c: r[c] for c in columns if c in r} for r in rows]
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
        present = [c for c in columns if c in ds.column_names]
        out: list[dict[str, Any]] = ds.select_columns(present).to_list()
        return out
    except ConfigError:
        raise
    except Exception as exc:  # every hub failure gets the same one-line advice
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ConfigError(
            f"{where}: cannot load dataset {name!r}"
            + (f" config {config!r}" if config else "")
            + f" split {split!r} ({detail[:300]}); "
            + _LOCAL_ALTERNATIVE.format(where=where)
        ) from None


def _rows(source: str, split: str, config: str | None, columns: list[str], where: str) -> Any:
    path = Path(source)
    if path.suffix in _LOCAL:
        return _rows_from_local(path, where)
    return _rows_from_hub(source, split, config, columns, where)


def _texts(
    rows: list[dict[str, Any]], field_name: str, source: str, where: str
) -> tuple[list[tuple[int, dict[str, Any], str | None]], dict[str, int]]:
    """(row index, row, text or None when it is no string) per row; counts of non-text rows.

    A field that holds no text in any row is a config mistake (a `messages` list, say): an error
    naming the field and what it holds. A few non-text rows among text ones are data: skipped and
    counted as what they are.
    """
    out: list[tuple[int, dict[str, Any], str | None]] = []
    not_string: dict[str, int] = {}
    for i, row in enumerate(rows):
        if field_name not in row:
            raise ConfigError(f"{where}: row {i} of {source} has no column {field_name!r}")
        value = row[field_name]
        if isinstance(value, str):
            out.append((i, row, value))
            continue
        kind = _json_type(value)
        not_string[kind] = not_string.get(kind, 0) + 1
        out.append((i, row, None))
    if rows and sum(not_string.values()) == len(rows):
        kinds = ", ".join(sorted(not_string))
        raise ConfigError(
            f"{where}: column {field_name!r} of {source} holds {kinds} values, not text; name the "
            "column that holds the prompt as a string"
        )
    return out, not_string


def check_unique_ids(records: list[PromptRecord], source: str, where: str) -> None:
    """Answers are matched to prompts by id: two different prompts with one id would swap them."""
    seen: dict[str, str] = {}
    for r in records:
        other = seen.setdefault(r["prompt_id"], r["prompt"])
        if other != r["prompt"]:
            raise ConfigError(
                f"{where}: id {r['prompt_id']!r} of {source} belongs to two different prompts "
                f"({' '.join(other.split())[:40]!r}... and {' '.join(r['prompt'].split())[:40]!r}"
                "...); ids must be unique: fix the source, or set the id field to null (ids "
                "hashed from the text)"
            )


def load_prompt_source(cfg: PromptsConfig) -> PromptPool:
    """All usable prompts of the source, de-duplicated, in source order, with the counts."""
    columns = [cfg.field, *([cfg.id_field] if cfg.id_field else [])]
    rows = _rows(cfg.source, cfg.split, None, columns, "prompts.source")
    texts, not_string = _texts(rows, cfg.field, cfg.source, "prompts.field")
    pool = PromptPool(rows=len(rows), not_string=not_string)
    seen: set[str] = set()
    for _, row, text in texts:
        if text is None:
            continue
        if not text.strip():
            pool.empty += 1
            continue
        # Compared normalised, so one instruction spelled twice never lands in two slices.
        if normalise_instruction(text) in seen:
            pool.duplicates += 1
            continue
        seen.add(normalise_instruction(text))
        pool.records.append({"prompt_id": prompt_id(row, text, cfg.id_field), "prompt": text})
    check_unique_ids(pool.records, cfg.source, "prompts.id_field")
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
    columns = [cfg.field, "dataset", *([cfg.id_field] if cfg.id_field else [])]
    rows = _rows(cfg.source, cfg.split, cfg.name, columns, "evaluation.prompts.source")
    texts, _ = _texts(rows, cfg.field, cfg.source, "evaluation.prompts.field")
    out: list[PromptRecord] = []
    seen: set[str] = set()
    for i, row, text in texts:
        if text is None or not text.strip() or normalise_instruction(text) in seen:
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
    check_unique_ids(out, cfg.source, "evaluation.prompts.id_field")
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
