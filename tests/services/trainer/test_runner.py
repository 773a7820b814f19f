"""`run_train_job` called directly: reference choices, crash-after-last-checkpoint, locks, conflicts,
and the multi-process path through a real `accelerate launch` (two CPU ranks, gloo)."""

from __future__ import annotations

import fcntl
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from pairloop.checkpoints import COMPLETE_MARKER
from pairloop.errors import ConflictError, ValidationError
from pairloop.jobs import TrainProgress, TrainResult
from pairloop_local.tiny_models import build_tiny_chat_model
from services.trainer.runner import run_train_job
from services.trainer.settings import TrainerSettings

from .helpers import make_job


@pytest.fixture(scope="module")
def settings(model_store: Path) -> Iterator[TrainerSettings]:
    """In-process training here sets torch's thread count (cpu_threads); restore it after."""
    import torch

    threads = torch.get_num_threads()
    yield TrainerSettings(
        model_store_root=model_store, redis_url="redis://unused:1/0", cpu_threads=1
    )
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_run(
    model_store: Path, settings: TrainerSettings
) -> tuple[TrainResult, list[TrainProgress]]:
    """A job whose reference differs from the policy, with precomputed reference log-probs."""
    build_tiny_chat_model(model_store / "base-seed1", seed=1)
    hyperparameters = {
        **make_job("x").hyperparameters.model_dump(),
        "precompute_ref_log_probs": True,
    }
    job = make_job("ref-precompute", reference_path="base-seed1", hyperparameters=hyperparameters)
    events: list[TrainProgress] = []
    return run_train_job(job, settings, report=events.append), events


def test_explicit_reference_and_precomputed_log_probs(
    reference_run: tuple[TrainResult, list[TrainProgress]],
) -> None:
    # With precomputed log-probs the reference model is dropped before the first step.
    result, events = reference_run
    assert result.steps == 8 and math.isfinite(result.metrics["loss"])
    # Measured against a different model, the implicit rewards start away from zero.
    first = next(p for p in events if p.phase == "training" and p.loss is not None)
    assert first.rewards_margins != 0.0
    assert [p.phase for p in events][-2:] == ["validating", "publishing"]


def test_crash_after_the_final_checkpoint_republishes_it_without_extra_steps(
    model_store: Path, settings: TrainerSettings
) -> None:
    keep = settings.model_copy(update={"keep_checkpoints": True})
    job = make_job("final-ckpt")
    first = run_train_job(job, keep)
    output = Path(first.checkpoint_path)
    weights = load_file(str(output / "model.safetensors"))
    shutil.rmtree(output)  # as if the worker died between the last checkpoint and the rename

    again = run_train_job(job, keep)
    assert again.resumed_from_step == again.steps == first.steps == 8
    republished = load_file(str(output / "model.safetensors"))
    assert all((republished[n] == weights[n]).all() for n in weights)
    shutil.rmtree(keep.jobs_root / job.job_id)


def test_a_job_held_by_another_worker_is_refused(
    model_store: Path, settings: TrainerSettings
) -> None:
    job = make_job("locked")
    work = settings.jobs_root / job.job_id
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"pid 4242 on other-host", 0)
        with pytest.raises(
            ConflictError, match="being trained right now by pid 4242 on other-host"
        ):
            run_train_job(job, settings)
    finally:
        os.close(fd)
    assert not (model_store / "out" / "locked").exists()


def test_same_output_with_other_settings_is_a_conflict(
    reference_run: tuple[TrainResult, list[TrainProgress]], settings: TrainerSettings
) -> None:
    output = Path(reference_run[0].checkpoint_path)
    before = (output / "model.safetensors").stat().st_mtime_ns
    job = make_job("ref-precompute")  # same job id and output, but the reference is the base
    with pytest.raises(ConflictError, match="Choose a new output_path"):
        run_train_job(job, settings)
    assert (output / "model.safetensors").stat().st_mtime_ns == before


def test_accelerate_launch_trains_on_two_cpu_ranks(
    model_store: Path, settings: TrainerSettings
) -> None:
    launched = settings.model_copy(update={"launcher": "accelerate", "num_processes": 2})
    job = make_job("ddp")
    job.hyperparameters.strategy = "ddp"
    job.hyperparameters.per_device_train_batch_size = 2  # 2 ranks x 2 = the same global batch
    events: list[TrainProgress] = []
    result = run_train_job(job, launched, report=events.append)
    assert result.steps == 8 and math.isfinite(result.metrics["loss"])
    # DDP: every rank holds the whole policy and the whole reference (what sharding avoids).
    assert result.strategy == "ddp" and [r.rank for r in result.ranks] == [0, 1]
    for rank in result.ranks:
        assert rank.policy_local_numel == rank.policy_numel and rank.sharded_tensors == 0
        assert rank.reference_local_numel == rank.policy_numel
    assert result.timings["startup"] > 0  # launching the ranks is visible in the timings
    assert (model_store / "out" / "ddp" / COMPLETE_MARKER).is_file()
    assert any(p.phase == "training" for p in events)
    assert events[-1].phase == "publishing"


def test_errors_inside_launched_ranks_keep_their_type_and_message(
    model_store: Path, settings: TrainerSettings
) -> None:
    launched = settings.model_copy(update={"launcher": "accelerate", "num_processes": 1})
    job = make_job("rank-error")
    job.hyperparameters.bf16 = True  # impossible on CPU: the rank refuses it
    with pytest.raises(ValidationError, match="bf16 is true but the trainer runs on CPU"):
        run_train_job(job, launched)
    assert not (model_store / "out" / "rank-error").exists()


@pytest.mark.gpu
def test_cuda_training_uses_mixed_precision_and_publishes_in_the_policy_dtype(
    model_store: Path, settings: TrainerSettings
) -> None:
    on_gpu = settings.model_copy(update={"device": "cuda", "launcher": "in-process"})
    job = make_job("cuda")  # bf16 and gradient checkpointing are "auto": on with CUDA
    result = run_train_job(job, on_gpu)
    assert result.steps == 8 and math.isfinite(result.metrics["loss"])
    weights = load_file(str(Path(result.checkpoint_path) / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"float32"}  # the policy's dtype
