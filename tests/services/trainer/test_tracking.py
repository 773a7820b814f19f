"""Experiment tracking through the real trainer on the tiny model: TensorBoard event files where the
job says, `trainer_state.json` beside the published weights, TRL's evaluate on the held-out split,
and the job's mean figures beside its last step's."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from pairloop.errors import ForbiddenError
from pairloop.jobs import DPOHyperparameters, TrainResult
from pairloop.preference_data import write_preference_split
from services.trainer.dpo import dpo_config_kwargs
from services.trainer.runner import run_train_job
from services.trainer.settings import TrainerSettings

from .helpers import make_job, preference_rows


@pytest.fixture(scope="module")
def settings(model_store: Path) -> Iterator[TrainerSettings]:
    import torch

    threads = torch.get_num_threads()
    yield TrainerSettings(
        model_store_root=model_store, redis_url="redis://unused:1/0", cpu_threads=1
    )
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tracked(model_store: Path, settings: TrainerSettings) -> TrainResult:
    data = model_store / "data" / "tracked"
    write_preference_split(data, "train_iteration_1", preference_rows(16))
    write_preference_split(data, "test_iteration_1", preference_rows(6))
    job = make_job(
        "tracked",
        dataset_path="data/tracked",
        eval_split="test_iteration_1",
        logging_dir="runs/tracked/tensorboard/iter1",
        hyperparameters={**make_job("x").hyperparameters.model_dump(), "max_steps": 4},
    )
    return run_train_job(job, settings)


def test_tensorboard_event_files_are_written_where_the_job_says(
    tracked: TrainResult, model_store: Path
) -> None:
    events = list((model_store / "runs" / "tracked" / "tensorboard" / "iter1").rglob("events.*"))
    assert events, "no TensorBoard event file"
    content = b"".join(p.read_bytes() for p in events)
    # Scalars are recorded under transformers' names: per-step DPO loss and rewards, and eval.
    for tag in (b"train/loss", b"train/rewards/margins", b"eval/loss"):
        assert tag in content, tag


def test_published_checkpoint_keeps_the_trainer_state(tracked: TrainResult) -> None:
    state = json.loads((Path(tracked.checkpoint_path) / "trainer_state.json").read_text())
    assert state["global_step"] == tracked.steps == 4
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


def test_eval_on_the_held_out_split_and_means_beside_the_last_step(tracked: TrainResult) -> None:
    m = tracked.metrics
    assert math.isfinite(m["eval_loss"])
    assert 0.0 <= m["eval_rewards/accuracies"] <= 1.0
    assert "eval_rewards/margins" in m
    state = json.loads((Path(tracked.checkpoint_path) / "trainer_state.json").read_text())
    steps = [e for e in state["log_history"] if "loss" in e]
    assert m["mean/loss"] == pytest.approx(sum(e["loss"] for e in steps) / len(steps))
    assert m["rewards/accuracies"] == pytest.approx(steps[-1]["rewards/accuracies"])
    assert m["mean/rewards/accuracies"] == pytest.approx(
        sum(e["rewards/accuracies"] for e in steps) / len(steps)
    )


def test_report_to_reaches_dpo_config_and_accepts_trl_spellings() -> None:
    assert DPOHyperparameters().report_to == ["tensorboard"]  # offline event files by default
    assert DPOHyperparameters(report_to="none").report_to == []
    assert DPOHyperparameters(report_to="wandb").report_to == ["wandb"]
    with pytest.raises(ValueError, match="report_to"):
        DPOHyperparameters(report_to=["mlflw"])
    assert dpo_config_kwargs(
        DPOHyperparameters(report_to="wandb"), bf16=False, gradient_checkpointing=False
    )["report_to"] == ["wandb"]


def test_a_logging_dir_outside_the_store_is_refused(
    settings: TrainerSettings, tmp_path: Path
) -> None:
    with pytest.raises(ForbiddenError):
        run_train_job(make_job("escape", logging_dir=str(tmp_path / "tb")), settings)
