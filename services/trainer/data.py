"""Reading a preference split and turning it into TRL's conversational prompt/chosen/rejected form.

Two layouts are accepted, as the alignment-handbook and TRL users write them:

* Snorkel / UltraFeedback-binarized (what `pairloop.preference_data` writes): `chosen` and
  `rejected` are whole conversations `[{role: user, ...}, {role: assistant, ...}]`; the shared
  leading turns are the prompt, the turns after them are the completions.
* TRL's explicit-prompt form: `prompt` is a message list and `chosen`/`rejected` are the
  assistant turn(s) only.

Every row is checked before any model is loaded, and an error names the split, the row (and its
`prompt_id`), the column and what is wrong, so a bad dataset fails in a second, not after the
model has loaded. Loading goes through `datasets.load_dataset`, so a hub-style directory with a
`configs` card (or a plain `train.jsonl`) works as it does for the handbook recipes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairloop.errors import NotFoundError, ValidationError
from pairloop.losses import PROBABILITY_COLUMNS

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "REQUIRED_COLUMNS",
    "dataset_content_hash",
    "load_preference_split",
    "require_win_probabilities",
    "to_conversational",
    "validate_rows",
]

REQUIRED_COLUMNS = ("chosen", "rejected")
ROLES = ("system", "user", "assistant")
# At most this many problems are listed in one error: enough to see the pattern.
_MAX_REPORTED = 5


def dataset_content_hash(path: Path) -> str:
    """Hash of every data file under `path`: the key of this dataset's `datasets` cache.

    `datasets` caches local files by path and modification time, so a split rewritten within the
    same second can be served stale. Keying the cache directory on content makes that impossible.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        digest.update(str(rel).encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_preference_split(path: Path, split: str, *, cache_dir: Path) -> Dataset:
    """Load split `split` of the dataset directory `path`; raise a typed error that says why not."""
    import datasets
    from datasets.exceptions import DatasetsError

    if not path.exists():
        raise NotFoundError(
            f"dataset_path {str(path)!r} does not exist; write the preference split there first "
            "(pairloop.preference_data.write_preference_split)",
            param="dataset_path",
        )
    if not path.is_dir():
        raise ValidationError(
            f"dataset_path {str(path)!r} is a file; give the dataset directory that holds the "
            "README.md configs block and the split files",
            param="dataset_path",
        )
    try:
        loaded = datasets.load_dataset(str(path), split=split, cache_dir=str(cache_dir))
    except ValueError as exc:
        if "Unknown split" in str(exc):
            raise NotFoundError(
                f"dataset {str(path)!r} has no split {split!r}: {exc}", param="split"
            ) from exc
        raise ValidationError(f"dataset {str(path)!r} could not be read: {exc}") from exc
    except datasets.data_files.EmptyDatasetError as exc:
        raise ValidationError(
            f"dataset {str(path)!r} holds no data files: {exc}", param="dataset_path"
        ) from exc
    except StopIteration as exc:
        # What `datasets` raises for a split whose file is empty.
        raise ValidationError(
            f"split {split!r} of dataset {str(path)!r} is empty; it needs preference pairs",
            param="dataset_path",
        ) from exc
    except DatasetsError as exc:
        cause = exc.__cause__ or exc
        raise ValidationError(
            f"split {split!r} of dataset {str(path)!r} could not be parsed "
            f"({type(cause).__name__}: {cause}); every line must be one JSON object",
            param="dataset_path",
        ) from exc
    if not isinstance(loaded, datasets.Dataset):
        raise ValidationError(f"dataset {str(path)!r} split {split!r} is not a map-style dataset")
    if loaded.num_rows == 0:
        raise ValidationError(
            f"split {split!r} of dataset {str(path)!r} is empty; it needs preference pairs",
            param="dataset_path",
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in loaded.column_names]
    if missing:
        raise ValidationError(
            f"split {split!r} of dataset {str(path)!r} is missing column(s) {missing}; it has "
            f"{loaded.column_names}. Expected the Snorkel columns (prompt_id, prompt, chosen, "
            "rejected, ...) with chosen/rejected as message lists",
            param="dataset_path",
        )
    return loaded


def _message_problem(msg: Any) -> str | None:
    if not isinstance(msg, Mapping):
        return f"is {type(msg).__name__}, not a {{role, content}} object"
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES:
        return f"has role {role!r}; roles are {list(ROLES)}"
    if not isinstance(content, str):
        return "has no text content" if content is None else "has non-text content"
    return None


def _split_row(row: Mapping[str, Any]) -> tuple[list[dict], list[dict], list[dict]] | str:
    """(prompt, chosen, rejected) message lists of one row, or a sentence saying what is wrong."""
    convs: dict[str, list[dict]] = {}
    for column in ("prompt", *REQUIRED_COLUMNS):
        value = row.get(column)
        if column == "prompt" and not isinstance(value, list):
            continue  # a plain-text prompt column (Snorkel) is informative only
        if not isinstance(value, list) or not value:
            return f"{column} must be a non-empty list of messages, got {type(value).__name__}"
        for i, msg in enumerate(value):
            problem = _message_problem(msg)
            if problem:
                return f"{column}[{i}] {problem}"
        convs[column] = [{"role": m["role"], "content": m["content"]} for m in value]
    chosen, rejected = convs["chosen"], convs["rejected"]
    if "prompt" in convs:
        prompt = convs["prompt"]
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            return "chosen and rejected share no leading prompt turn (expected [user, assistant])"
    if prompt[-1]["role"] != "user":
        return f"the prompt must end with a user turn, it ends with {prompt[-1]['role']!r}"
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if completion[0]["role"] != "assistant":
            return f"{name} must continue the prompt with an assistant turn"
    return prompt, chosen, rejected


def validate_rows(rows: Sequence[Mapping[str, Any]] | Dataset, *, split: str) -> None:
    """Raise ValidationError naming the first malformed rows (index, prompt_id, what is wrong)."""
    problems = []
    for index, row in enumerate(rows):
        outcome = _split_row(row)
        if isinstance(outcome, str):
            ident = f" (prompt_id {row['prompt_id']!r})" if row.get("prompt_id") else ""
            problems.append(f"row {index}{ident}: {outcome}")
            if len(problems) >= _MAX_REPORTED:
                break
    if problems:
        raise ValidationError(
            f"split {split!r} has malformed rows:\n  " + "\n  ".join(problems), param="dataset_path"
        )


def _convert(row: Mapping[str, Any]) -> dict[str, list[dict]]:
    outcome = _split_row(row)
    if isinstance(outcome, str):  # validate_rows ran first; this is a programming error
        raise ValueError(outcome)
    prompt, chosen, rejected = outcome
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def to_conversational(dataset: Dataset, *, split: str) -> Dataset:
    """Validate every row, then keep TRL's conversational prompt/chosen/rejected columns (and the
    win probabilities, where the dataset has them: SPPO trains on them)."""
    validate_rows(dataset, split=split)
    # Columns of nulls (pairs ranked in bubble mode, which gives no probabilities) are dropped.
    kept = [
        c
        for c in PROBABILITY_COLUMNS
        if c in dataset.column_names and any(v is not None for v in dataset[c])
    ]
    return dataset.map(
        _convert,
        remove_columns=[c for c in dataset.column_names if c not in kept],
        desc=f"Preparing {split} pairs",
    )


def require_win_probabilities(dataset: Dataset, *, split: str) -> None:
    """ValidationError unless every row has both win probabilities, each in [0, 1] (SPPO)."""
    missing = [c for c in PROBABILITY_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValidationError(
            f"split {split!r} has no column(s) {missing}: loss_type sppo trains on the ranker's "
            "win probabilities. Rank with the ranker's full mode (bubble mode gives none) or "
            "choose another loss_type",
            param="hyperparameters.loss_type",
        )
    for column in PROBABILITY_COLUMNS:
        for index, value in enumerate(dataset[column]):
            if value is None or not 0.0 <= float(value) <= 1.0:
                raise ValidationError(
                    f"split {split!r} row {index}: {column} is {value!r}, not a probability; "
                    "loss_type sppo needs one for every pair (the ranker's full mode)",
                    param="hyperparameters.loss_type",
                )
