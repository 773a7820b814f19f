"""One training job from start to finish: the library function behind the Celery task.

    result = run_train_job(job, settings, report=print)

Order of work, cheapest checks first so bad input fails in a second:
resolve every path inside the model store -> return the stored result if this job already
published -> take the job's lock -> check policy/reference checkpoints and the dataset ->
train (in this process, or through `accelerate launch` on several GPUs) -> validate -> publish.
Trainer checkpoints live in the job's work directory (`<work root>/<job id>/checkpoints`), so a
resubmission after a crash resumes from the last complete one; they are deleted once published.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pairloop.checkpoints import read_manifest
from pairloop.errors import ConflictError, NotFoundError, ValidationError
from pairloop.jobs import TrainJob, TrainProgress, TrainResult
from pairloop.paths import resolve_inside
from services.trainer.data import dataset_content_hash
from services.trainer.dpo import ADAPTER_DIR, checkpoint_dtype, train_policy
from services.trainer.publishing import (
    find_published,
    flush_tree,
    publish_checkpoint,
    remove_stale_staging,
    staging_dir_for,
    validate_trained,
)
from services.trainer.settings import TrainerSettings
from services.trainer.spec import (
    LOCK_FILE,
    TrainingOutcome,
    TrainingSpec,
    attempt_id,
    prepare_dataset,
    remove_incomplete_checkpoints,
)

__all__ = ["JobPaths", "resolve_job_paths", "run_train_job"]

log = logging.getLogger(__name__)

ProgressReport = Callable[[TrainProgress], None]


@dataclass(frozen=True)
class JobPaths:
    """Every filesystem location of one job, resolved and confined to the model store."""

    policy: Path
    reference: Path
    dataset: Path
    output: Path
    work: Path

    @property
    def checkpoints(self) -> Path:
        return self.work / "checkpoints"


def resolve_job_paths(job: TrainJob, settings: TrainerSettings) -> JobPaths:
    """Resolve the job's paths; ForbiddenError for any outside the model store root."""
    root = settings.store_root
    output = resolve_inside(root, job.output_path, param="output_path")
    if output == root:
        raise ValidationError(
            "output_path is the model store root itself; give a directory inside it",
            param="output_path",
        )
    return JobPaths(
        policy=resolve_inside(root, job.policy_path, param="policy_path"),
        reference=resolve_inside(root, job.reference_path, param="reference_path"),
        dataset=resolve_inside(root, job.dataset_path, param="dataset_path"),
        output=output,
        work=settings.jobs_root / job.job_id,
    )


def _check_model_dir(path: Path, param: str) -> None:
    if not path.exists():
        raise NotFoundError(f"{param} {str(path)!r} does not exist in the model store", param=param)
    try:
        read_manifest(path)
    except ValidationError as exc:
        raise ValidationError(
            f"{param} {str(path)!r} is not a usable checkpoint: {exc.message}", param=param
        ) from exc


@contextmanager
def _job_lock(work: Path, job_id: str) -> Iterator[None]:
    """Exclusive per-job lock; the kernel drops it when the holder dies, even by SIGKILL."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another worker"
            raise ConflictError(
                f"job {job_id} is being trained right now by {holder}; wait for that run to "
                "finish (its result is returned to any resubmission)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{attempt_id()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _prepare_work_dir(paths: JobPaths, job: TrainJob) -> None:
    """Keep checkpoints only if they came from this exact job; drop half-written ones."""
    stamp = paths.work / "job-fingerprint"
    if stamp.is_file() and stamp.read_text().strip() != job.fingerprint():
        log.warning("job %s was resubmitted with other settings: starting from step 0", job.job_id)
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
    stamp.write_text(job.fingerprint() + "\n")
    remove_incomplete_checkpoints(paths.checkpoints)


def _machines(job: TrainJob, settings: TrainerSettings) -> int:
    """Machines training `job`: its own `num_machines` (fanned out by the system), else the
    worker's (other machines joined by hand)."""
    own = job.hyperparameters.num_machines
    return own if own > 1 else settings.num_machines


def _choose_device(settings: TrainerSettings, machines: int) -> tuple[Literal["cpu", "cuda"], int]:
    """(device, number of training processes on this machine) for this job."""
    import torch

    cuda = torch.cuda.is_available()
    if settings.device == "cuda" and not cuda:
        raise ValidationError("PAIRLOOP_TRAINER_DEVICE is cuda but no CUDA device is visible")
    use_cuda = settings.device == "cuda" or (settings.device == "auto" and cuda)
    device: Literal["cpu", "cuda"] = "cuda" if use_cuda else "cpu"
    if settings.launcher == "in-process" and machines == 1:
        return device, 1
    visible = torch.cuda.device_count() if device == "cuda" else 1
    processes = settings.num_processes or visible
    if settings.launcher == "accelerate" or processes > 1 or machines > 1:
        return device, max(processes, 1)
    return device, 1


def _launched(settings: TrainerSettings, processes: int, machines: int) -> bool:
    return processes > 1 or settings.launcher == "accelerate" or machines > 1


def run_train_job(
    job: TrainJob,
    settings: TrainerSettings,
    *,
    report: ProgressReport | None = None,
    on_locked: Callable[[], None] | None = None,
) -> TrainResult:
    """Train `job` and publish its weights, or return the result it already published.

    `on_locked` runs once the job's lock is held (the worker counts the delivery there).
    """
    clock = _Clock()
    emit: ProgressReport = report or (lambda _p: None)
    paths = resolve_job_paths(job, settings)
    published = find_published(paths.output, job)
    if published is not None:
        return published

    with _job_lock(paths.work, job.job_id):
        # Another worker may have published while we waited for the broker to hand us the job.
        published = find_published(paths.output, job)
        if published is not None:
            return published
        if on_locked is not None:
            on_locked()
        _check_model_dir(paths.policy, "policy_path")
        _check_model_dir(paths.reference, "reference_path")
        _prepare_work_dir(paths, job)
        remove_stale_staging(paths.output, job)
        spec = _training_spec(job, paths, settings)
        try:
            result = _train_and_publish(spec, paths, settings, emit, clock)
        except BaseException:
            # Publish nothing; keep the trainer checkpoints so a resubmission resumes.
            shutil.rmtree(spec.staging_dir, ignore_errors=True)
            raise
    if not settings.keep_checkpoints:
        shutil.rmtree(paths.work, ignore_errors=True)
    log.info("job %s published %s in %.1fs", job.job_id, paths.output, result.seconds)
    return result


@dataclass
class _Clock:
    """Wall time of the job's phases, for `TrainResult.timings`."""

    started_at: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    _mark: float = field(default_factory=time.monotonic)

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self._mark
        self._mark = now

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _training_spec(job: TrainJob, paths: JobPaths, settings: TrainerSettings) -> TrainingSpec:
    content = dataset_content_hash(paths.dataset) if paths.dataset.is_dir() else "missing"
    return TrainingSpec(
        job=job,
        policy_path=str(paths.policy),
        reference_path=str(paths.reference),
        dataset_path=str(paths.dataset),
        dataset_cache=str(paths.work / "datasets-cache" / content),
        checkpoints_dir=str(paths.checkpoints),
        staging_dir=str(staging_dir_for(paths.output, job)),
        device="cpu",  # chosen once the data has been checked (that needs no torch)
        save_total_limit=settings.save_total_limit,
        cpu_threads=settings.cpu_threads,
        publish_max_shard_size=settings.publish_max_shard_size,
        logging_dir=str(
            resolve_inside(settings.store_root, job.logging_dir, param="logging_dir")
            if job.logging_dir
            else paths.work / "tensorboard"
        ),
    )


def _with_world(emit: ProgressReport, *, machines: int, world_size: int) -> ProgressReport:
    """Every progress report says how many machines and ranks train the job."""

    def report(progress: TrainProgress) -> None:
        emit(progress.model_copy(update={"machines": machines, "world_size": world_size}))

    return report


def _launch(spec: TrainingSpec, settings: TrainerSettings, emit: ProgressReport) -> TrainingOutcome:
    if spec.job.hyperparameters.num_machines > 1:
        from services.trainer.fanout import train_across_machines

        return train_across_machines(spec, settings, report=emit)
    from services.trainer.launcher import train_with_accelerate

    return train_with_accelerate(spec, settings, report=emit)


def _train_and_publish(
    spec: TrainingSpec,
    paths: JobPaths,
    settings: TrainerSettings,
    emit: ProgressReport,
    clock: _Clock,
) -> TrainResult:
    job, staging = spec.job, Path(spec.staging_dir)
    # Validated here, before torch is even imported, so bad data fails in a second.
    dataset = prepare_dataset(spec)
    machines = _machines(job, settings)
    device, processes = _choose_device(settings, machines)
    spec.device = device
    launched = _launched(settings, processes, machines)
    if launched:
        spec.world_size = processes * machines
        spec.strategy = job.hyperparameters.strategy or settings.strategy
    # Fail now, not in every rank: the global batch must split over the ranks.
    try:
        job.hyperparameters.gradient_accumulation_for(spec.world_size)
    except ValueError as exc:
        raise ValidationError(str(exc), param="hyperparameters.global_batch_size") from None
    clock.lap("prepare")
    emit = _with_world(emit, machines=machines, world_size=spec.world_size)
    if launched:
        del dataset  # every rank loads it from the cache just written
        outcome = _launch(spec, settings, emit)
    else:
        outcome = train_policy(spec, emit, dataset)
    gc.collect()
    clock.lap("startup")
    # "startup" is what the phases timed inside training do not cover: imports, launching ranks.
    clock.timings["startup"] = max(clock.timings["startup"] - sum(outcome.timings.values()), 0.0)
    clock.timings.update(outcome.timings)

    last = TrainProgress(
        phase="validating",
        step=outcome.steps,
        total_steps=outcome.total_steps,
        resumed_from_step=outcome.resumed_from_step,
        checkpoint_step=outcome.steps,
        loss=outcome.metrics.get("loss"),
        rewards_margins=outcome.metrics.get("rewards/margins"),
        rewards_accuracies=outcome.metrics.get("rewards/accuracies"),
    )
    emit(last)
    validate_trained(staging, paths.policy, dtype=checkpoint_dtype(str(paths.policy)))
    clock.lap("validate")
    emit(last.model_copy(update={"phase": "publishing"}))
    flush_tree(staging)
    # `publish` is the flush of the weights to disk; the rename that follows is instant.
    clock.lap("publish")
    result = TrainResult(
        job_id=job.job_id,
        checkpoint_path=str(paths.output),
        metrics=outcome.metrics,
        seconds=clock.elapsed,
        steps=outcome.steps,
        resumed_from_step=outcome.resumed_from_step,
        adapter_path=str(paths.output / ADAPTER_DIR) if outcome.adapter_saved else None,
        started_at=clock.started_at,
        timings={**clock.timings, "total": clock.elapsed},
        strategy=spec.strategy,
        world_size=spec.world_size,
        per_device_train_batch_size=job.hyperparameters.per_device_train_batch_size,
        gradient_accumulation_steps=outcome.gradient_accumulation_steps,
        global_batch_size=spec.world_size
        * job.hyperparameters.per_device_train_batch_size
        * outcome.gradient_accumulation_steps,
        ranks=outcome.ranks,
    )
    publish_checkpoint(staging, paths.output, job=job, result=result)
    return result
