"""What one training process is given and gives back, and where it resumes from.

`TrainingSpec` is a job with its paths resolved inside the model store and its device chosen;
the worker trains it in-process or writes it to `spec.json` for `accelerate launch` ranks, which
write a `TrainingOutcome` back. Both are JSON, never pickle.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from pairloop.checkpoints import COMPLETE_MARKER
from pairloop.jobs import RankReport, TrainJob
from services.trainer.data import load_preference_split, to_conversational

__all__ = [
    "LOCK_FILE",
    "TrainingOutcome",
    "TrainingSpec",
    "attempt_id",
    "job_lock_holder",
    "last_complete_checkpoint",
    "lock_holder",
    "prepare_dataset",
    "prepare_eval_dataset",
    "remove_incomplete_checkpoints",
    "renew_attempt",
]

log = logging.getLogger(__name__)

# The job's lock in its work directory (`runner._job_lock`): held by the attempt that trains it.
LOCK_FILE = ".lock"


def attempt_id() -> str:
    """This process's attempt at a job: what it writes into the job's lock file once it holds it."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def job_lock_holder(work: Path) -> str | None:
    """The attempt holding the job's lock in `work` right now, or None when nobody holds it."""
    return lock_holder(work / LOCK_FILE)


def lock_holder(path: Path) -> str | None:
    """What the holder of the flock on `path` wrote into it, or None when nobody holds it.

    The kernel drops a lock whose holder died (even by SIGKILL), so a held lock names a live
    process. Tested with a shared lock for an instant (never held); flock works across the
    machines of an NFSv4 model store.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 400, 0).decode(errors="replace").strip() or "?"
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def renew_attempt(work: Path) -> str:
    """A fresh attempt id for the job whose lock this process holds, written into the lock.

    A multi-machine job tries again in the same process: each try needs its own id, so that a
    machine's share sent for an earlier try never joins a later one.
    """
    attempt = f"{attempt_id()} try {uuid.uuid4().hex[:8]}"
    fd = os.open(work / LOCK_FILE, os.O_WRONLY)
    try:
        data = f"{attempt}\n".encode()
        os.pwrite(fd, data, 0)  # then truncate: never an empty lock file in between
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return attempt


class TrainingSpec(BaseModel):
    """A job with its paths resolved and its device chosen: what one training process needs.

    JSON-serializable, so `accelerate launch` ranks read the same spec from a file.
    """

    job: TrainJob
    policy_path: str
    reference_path: str
    dataset_path: str
    dataset_cache: str
    checkpoints_dir: str
    staging_dir: str
    device: Literal["cpu", "cuda"]
    save_total_limit: int = 2
    cpu_threads: int | None = None
    owner_pid: int | None = None  # launched ranks exit when this process (the task) is gone
    # The attempt that wrote this spec (`attempt_id()`, as in the job's lock): a joiner uses a
    # spec only while that attempt holds the job's lock, never one an earlier attempt left.
    attempt: str | None = None
    strategy: Literal["single-process", "ddp", "fsdp"] = "single-process"
    world_size: int = 1  # training processes over all machines
    publish_max_shard_size: str = "5GB"
    logging_dir: str | None = None  # TensorBoard event files (the job's, resolved in the store)


class TrainingOutcome(BaseModel):
    """What training produced, before validation and publishing."""

    steps: int
    total_steps: int
    resumed_from_step: int
    metrics: dict[str, float]
    timings: dict[str, float]
    adapter_saved: bool
    gradient_accumulation_steps: int = 1
    ranks: list[RankReport] = []


def prepare_dataset(spec: TrainingSpec) -> Any:
    """Load and validate the job's split as TRL conversational rows (cached under the job)."""
    raw = load_preference_split(
        Path(spec.dataset_path), spec.job.split_name, cache_dir=Path(spec.dataset_cache)
    )
    return to_conversational(raw, split=spec.job.split_name)


def prepare_eval_dataset(spec: TrainingSpec) -> Any:
    """The job's evaluation split as TRL conversational rows, or None when it has none."""
    split = spec.job.eval_split
    if split is None:
        return None
    raw = load_preference_split(Path(spec.dataset_path), split, cache_dir=Path(spec.dataset_cache))
    return to_conversational(raw, split=split)


def last_complete_checkpoint(checkpoints_dir: Path) -> tuple[Path, int] | None:
    """The newest `checkpoint-N` that was fully written (it holds our marker), and N."""
    best: tuple[Path, int] | None = None
    if not checkpoints_dir.is_dir():
        return None
    for path in checkpoints_dir.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if (
            step.isdigit()
            and (path / COMPLETE_MARKER).is_file()
            and (best is None or int(step) > best[1])
        ):
            best = (path, int(step))
    return best


def remove_incomplete_checkpoints(checkpoints: Path) -> None:
    """Drop trainer checkpoints an interrupted save left half-written (no completion marker)."""
    if checkpoints.is_dir():
        for ckpt in checkpoints.glob("checkpoint-*"):
            if not (ckpt / COMPLETE_MARKER).is_file():
                log.warning("removing incomplete trainer checkpoint %s", ckpt)
                shutil.rmtree(ckpt, ignore_errors=True)
