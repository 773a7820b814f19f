"""Validating trained weights and publishing them atomically at the job's output path.

A published checkpoint directory is complete the moment it appears: the weights, the tokenizer,
the LoRA adapter (if any), `pairloop_train_result.json` and the `COMPLETE_MARKER` are all written
and fsynced in a hidden staging directory beside the output, which is then renamed into place
(`pairloop.atomic.publish_dir`). A reader polling the output path sees nothing, or everything.
The marker goes in before the rename rather than after it, so there is no moment at which the
output exists unmarked.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pairloop.atomic import atomic_write_json, atomic_write_text, publish_dir
from pairloop.checkpoints import COMPLETE_MARKER, compare_checkpoints, read_manifest
from pairloop.errors import ConflictError, ServerError, ValidationError
from pairloop.jobs import TrainJob, TrainResult

__all__ = [
    "JOB_FILE",
    "RESULT_FILE",
    "find_published",
    "flush_tree",
    "publish_checkpoint",
    "remove_stale_staging",
    "staging_dir_for",
    "validate_trained",
]

log = logging.getLogger(__name__)

RESULT_FILE = "pairloop_train_result.json"
JOB_FILE = "pairloop_train_job.json"


def staging_dir_for(output: Path, job: TrainJob) -> Path:
    """A hidden sibling of `output` (same filesystem, so the final rename is atomic)."""
    return output.parent / f".{output.name}.staging-{job.job_id}"


def remove_stale_staging(output: Path, job: TrainJob) -> None:
    """Drop what a killed run of this job left half-written beside the output."""
    staging = staging_dir_for(output, job)
    if staging.exists():
        log.warning("removing half-written staging directory %s from an interrupted run", staging)
        shutil.rmtree(staging)


def find_published(output: Path, job: TrainJob) -> TrainResult | None:
    """The stored result if this exact job already published `output`, else None.

    An output published by a different job (or the same job id with other settings) is never
    overwritten: that checkpoint may already be serving.
    """
    marker, result_file = output / COMPLETE_MARKER, output / RESULT_FILE
    if not output.exists():
        return None
    if not marker.is_file() or not result_file.is_file():
        raise ConflictError(
            f"output_path {str(output)!r} exists but is not a checkpoint published by the "
            "trainer (no completion marker); choose a new output_path or remove it",
            param="output_path",
        )
    try:
        stored = TrainResult.model_validate_json(result_file.read_text())
        stored_job = TrainJob.model_validate_json((output / JOB_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConflictError(
            f"output_path {str(output)!r} holds an unreadable training result ({exc}); choose a "
            "new output_path or remove it",
            param="output_path",
        ) from exc
    if stored_job.fingerprint() != job.fingerprint():
        raise ConflictError(
            f"output_path {str(output)!r} was already published by job {stored.job_id!r} with "
            "different settings; a published checkpoint is never overwritten. Choose a new "
            "output_path (or a new run_id) for this job",
            param="output_path",
        )
    return stored.model_copy(update={"reused": True})


def _check_finite(path: Path, dtype: str) -> None:
    """Load the trained model like a consumer would and refuse NaN/inf weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ServerError(f"the trained checkpoint does not load: {exc}") from exc
    try:
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    finally:
        del model
    if bad:
        raise ServerError(
            f"training produced non-finite weights in {len(bad)} tensors (e.g. {bad[:3]}); nothing "
            "was published. Lower hyperparameters.learning_rate and submit the job again"
        )


def validate_trained(staged: Path, policy: Path, *, dtype: str) -> None:
    """Raise unless `staged` loads and has exactly the policy's parameter names and shapes."""
    try:
        expected, actual = read_manifest(policy), read_manifest(staged)
    except ValidationError as exc:
        raise ServerError(f"the trained checkpoint is unreadable: {exc.message}") from exc
    problems = compare_checkpoints(expected, actual)
    if problems:
        raise ServerError(
            "the trained checkpoint does not match the policy, so the generator could not swap "
            "it in: " + "; ".join(problems[:5])
        )
    _check_finite(staged, dtype)


def flush_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk before it becomes visible."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_checkpoint(staged: Path, output: Path, *, job: TrainJob, result: TrainResult) -> None:
    """Write the job, result and marker into `staged` and rename it to `output`.

    Call `flush_tree(staged)` first: the weights must be on disk before the rename shows them.
    """
    atomic_write_text(staged / JOB_FILE, job.model_dump_json(indent=2) + "\n")
    atomic_write_json(staged / RESULT_FILE, result.model_dump(mode="json"))
    atomic_write_text(staged / COMPLETE_MARKER, f"{job.job_id}\n")
    publish_dir(staged, output)
