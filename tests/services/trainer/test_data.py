"""Preference split loading and checks: what TRL receives, and the errors a bad dataset gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pairloop.errors import NotFoundError, ValidationError
from pairloop.preference_data import write_preference_split
from services.trainer.data import (
    dataset_content_hash,
    load_preference_split,
    to_conversational,
    validate_rows,
)

from .helpers import preference_rows

U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
B = {"role": "assistant", "content": "b"}


def write_split(root: Path, rows: list[dict] | None, *, raw: str | None = None) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    text = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows or [])
    (root / "data" / "train.jsonl").write_text(text)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train_iteration_1\n    path: data/train.jsonl\n---\n"
    )
    return root


def test_snorkel_rows_become_trl_conversational_pairs(tmp_path: Path) -> None:
    write_preference_split(tmp_path / "ds", "train_iteration_1", preference_rows(3))
    raw = load_preference_split(tmp_path / "ds", "train_iteration_1", cache_dir=tmp_path / "c")
    pairs = to_conversational(raw, split="train_iteration_1")
    assert pairs.column_names == ["prompt", "chosen", "rejected"]
    assert pairs[1] == {
        "prompt": [{"role": "user", "content": "Write a short poem about the number 1."}],
        "chosen": [{"role": "assistant", "content": "The sea is blue, and 1 waves roll in."}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }


def test_multi_turn_prompt_is_the_shared_prefix() -> None:
    system = {"role": "system", "content": "be brief"}
    follow = {"role": "user", "content": "and?"}
    row = {"chosen": [system, U, A, follow, A], "rejected": [system, U, A, follow, B]}
    data = [row]
    validate_rows(data, split="s")
    from services.trainer.data import _convert

    out = _convert(row)
    assert out["prompt"] == [system, U, A, follow]
    assert out["chosen"] == [A] and out["rejected"] == [B]


def test_explicit_prompt_form_is_accepted() -> None:
    from services.trainer.data import _convert

    row = {"prompt": [U], "chosen": [A], "rejected": [B]}
    validate_rows([row], split="s")
    assert _convert(row) == {"prompt": [U], "chosen": [A], "rejected": [B]}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"chosen": [U, {"role": "bot", "content": "x"}], "rejected": [U, B]},
            "chosen[1] has role 'bot'",
        ),
        (
            {"chosen": [U, {"role": "assistant"}], "rejected": [U, B]},
            "chosen[1] has no text content",
        ),
        ({"chosen": "text", "rejected": [U, B]}, "chosen must be a non-empty list of messages"),
        ({"chosen": [U, A], "rejected": []}, "rejected must be a non-empty list"),
        ({"chosen": [U, ["x"]], "rejected": [U, B]}, "chosen[1] is list, not a {role, content}"),
        ({"chosen": [A], "rejected": [B]}, "chosen and rejected share no leading prompt turn"),
        ({"chosen": [U, A, A], "rejected": [U, A, B]}, "the prompt must end with a user turn"),
        (
            {"chosen": [U, U], "rejected": [U, A]},
            "chosen must continue the prompt with an assistant",
        ),
    ],
)
def test_malformed_rows_are_named_with_what_is_wrong(row: dict, expected: str) -> None:
    good = {"prompt_id": "ok", "chosen": [U, A], "rejected": [U, B]}
    with pytest.raises(ValidationError) as info:
        validate_rows([good, {"prompt_id": "p7", **row}], split="train_iteration_1")
    message = info.value.message
    assert "split 'train_iteration_1' has malformed rows" in message
    assert f"row 1 (prompt_id 'p7'): {expected}" in message


def test_many_bad_rows_are_summarised() -> None:
    rows = [{"chosen": "x", "rejected": "y"} for _ in range(20)]
    with pytest.raises(ValidationError) as info:
        validate_rows(rows, split="s")
    assert info.value.message.count("\n  row ") == 5


def test_missing_dataset_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_preference_split(tmp_path / "nope", "train_iteration_1", cache_dir=tmp_path / "c")


def test_dataset_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f.jsonl").write_text("{}\n")
    with pytest.raises(ValidationError, match="is a file"):
        load_preference_split(tmp_path / "f.jsonl", "train_iteration_1", cache_dir=tmp_path / "c")


def test_unknown_split_lists_the_ones_there(tmp_path: Path) -> None:
    write_preference_split(tmp_path / "ds", "train_iteration_1", preference_rows(2))
    with pytest.raises(NotFoundError) as info:
        load_preference_split(tmp_path / "ds", "train_iteration_2", cache_dir=tmp_path / "c")
    assert "no split 'train_iteration_2'" in info.value.message
    assert "train_iteration_1" in info.value.message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty"),
        ("{not json\n", "could not be parsed"),
        (json.dumps({"prompt": "q", "chosen": [U, A]}) + "\n", "missing column(s) ['rejected']"),
    ],
    ids=["empty", "not-json", "missing-column"],
)
def test_unreadable_splits(tmp_path: Path, content: str, expected: str) -> None:
    root = write_split(tmp_path / "ds", None, raw=content)
    with pytest.raises(ValidationError) as info:
        load_preference_split(root, "train_iteration_1", cache_dir=tmp_path / "c")
    assert expected in info.value.message


def test_content_hash_follows_content_not_names_or_hidden_files(tmp_path: Path) -> None:
    root = write_split(tmp_path / "ds", [{"chosen": [U, A], "rejected": [U, B]}])
    first = dataset_content_hash(root)
    (root / ".cache").mkdir()
    (root / ".cache" / "x").write_text("ignored")
    assert dataset_content_hash(root) == first
    write_split(root, [{"chosen": [U, B], "rejected": [U, A]}])
    assert dataset_content_hash(root) != first
