"""Preference datasets: Snorkel columns, named splits, loadable with `datasets.load_dataset`."""

from __future__ import annotations

from pathlib import Path

import datasets
import pydantic
import pytest

from pairloop.preference_data import (
    PREFERENCE_COLUMNS,
    load_rows,
    make_preference_row,
    read_split_names,
    write_preference_split,
)


def rows(n: int) -> list[dict]:
    return [
        make_preference_row(
            prompt_id=f"p{i}",
            prompt=f"question {i}",
            responses=["a", "bb", "ccc"],
            scores=[0.1, 0.9, -1.0],
            chosen_index=1,
            rejected_index=2,
        )
        for i in range(n)
    ]


def test_splits_load_with_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ds"
    write_preference_split(root, "train_iteration_1", rows(4))
    write_preference_split(root, "test_iteration_1", rows(2))
    assert read_split_names(root) == ["test_iteration_1", "train_iteration_1"]
    train = datasets.load_dataset(str(root), split="train_iteration_1")
    assert train.num_rows == 4
    assert tuple(train.column_names) == PREFERENCE_COLUMNS
    assert train[0]["chosen"] == [
        {"role": "user", "content": "question 0"},
        {"role": "assistant", "content": "bb"},
    ]
    assert train[0]["rejected"][1]["content"] == "ccc"


def test_rewriting_a_split_replaces_it(tmp_path: Path) -> None:
    write_preference_split(tmp_path, "train_iteration_1", rows(4))
    path = write_preference_split(tmp_path, "train_iteration_1", rows(3))
    assert len(load_rows(path)) == 3
    assert read_split_names(tmp_path) == ["train_iteration_1"]


def test_bad_rows_are_rejected(tmp_path: Path) -> None:
    bad = rows(1)[0] | {"all_rm_scores": [1.0]}
    with pytest.raises(pydantic.ValidationError, match="differ in length"):
        write_preference_split(tmp_path, "train_iteration_1", [bad])
    with pytest.raises(ValueError, match="no rows"):
        write_preference_split(tmp_path, "train_iteration_1", [])
    with pytest.raises(ValueError, match="split name"):
        write_preference_split(tmp_path, "../x", rows(1))
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
