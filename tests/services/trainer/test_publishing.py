"""Checks before publishing (shapes, NaN), refusals to overwrite, and the resume-point choice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pairloop.checkpoints import COMPLETE_MARKER
from pairloop.errors import ConflictError, ServerError
from pairloop.jobs import TrainResult
from services.trainer.publishing import (
    find_published,
    flush_tree,
    publish_checkpoint,
    staging_dir_for,
    validate_trained,
)
from services.trainer.spec import last_complete_checkpoint

from .helpers import make_job


def copy_with(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_trained_weights_must_match_the_policy(model_store: Path, tmp_path: Path) -> None:
    base = model_store / "base"
    validate_trained(base, base, dtype="float32")  # identical: fine

    def drop_one(t: dict) -> None:
        t.pop(sorted(t)[0])

    with pytest.raises(ServerError, match="1 tensors missing"):
        validate_trained(copy_with(base, tmp_path / "missing", drop_one), base, dtype="float32")

    def reshape(t: dict) -> None:
        name = next(n for n in sorted(t) if t[n].ndim == 2)
        t[name] = np.zeros((3, 3), dtype=t[name].dtype)

    with pytest.raises(ServerError, match="has shape \\[3, 3\\]"):
        validate_trained(copy_with(base, tmp_path / "shape", reshape), base, dtype="float32")


def test_non_finite_weights_are_never_published(model_store: Path, tmp_path: Path) -> None:
    def poison(t: dict) -> None:
        name = next(n for n in sorted(t) if "mlp" in n)
        t[name] = t[name].copy()
        t[name][0, 0] = np.nan

    poisoned = copy_with(model_store / "base", tmp_path / "nan", poison)
    with pytest.raises(ServerError, match="non-finite weights in 1 tensors"):
        validate_trained(poisoned, model_store / "base", dtype="float32")


def _publish(model_store: Path, job, tmp_path: Path) -> Path:
    output = tmp_path / "store" / "out"
    staged = staging_dir_for(output, job)
    shutil.copytree(model_store / "base", staged)
    result = TrainResult(
        job_id=job.job_id, checkpoint_path=str(output), metrics={}, seconds=1, steps=1
    )
    flush_tree(staged)
    publish_checkpoint(staged, output, job=job, result=result)
    return output


def test_published_output_is_reused_only_by_the_same_job(model_store: Path, tmp_path: Path) -> None:
    job = make_job("pub")
    output = _publish(model_store, job, tmp_path)
    assert (output / COMPLETE_MARKER).is_file() and not staging_dir_for(output, job).exists()
    reused = find_published(output, job)
    assert reused is not None and reused.reused and reused.job_id == job.job_id

    changed = make_job("pub", hyperparameters={"beta": 0.5})
    with pytest.raises(ConflictError, match="already published by job 'pub-iter1' with different"):
        find_published(output, changed)

    assert find_published(tmp_path / "store" / "elsewhere", job) is None
    (tmp_path / "store" / "foreign").mkdir()
    with pytest.raises(ConflictError, match="no completion marker"):
        find_published(tmp_path / "store" / "foreign", job)


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text(f"{step}\n")
    (tmp_path / "checkpoint-x").mkdir()
    found = last_complete_checkpoint(tmp_path)
    assert found == (tmp_path / "checkpoint-4", 4)
