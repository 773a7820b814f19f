"""The Celery task `pairloop.train_dpo`: validate the job, call `run_train_job`, report progress.

Thin on purpose: everything it does is in `runner.run_train_job`, which tests and scripts call
directly. Idempotent: the same job again returns the published result without training, and an
interrupted job resumes from its last trainer checkpoint. Send it by name with the JSON job
(`pairloop.train_client.submit_train_job`), with the job id as task id; read progress from
`AsyncResult(job_id).info` while the state is PROGRESS (a `TrainProgress`). A failed task's
error is a `pairloop.errors` type whose message says what to fix.
"""

from __future__ import annotations

import logging
from typing import Any

import pydantic
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from pairloop.errors import PairloopError, ServerError, ValidationError
from pairloop.jobs import TRAIN_TASK_NAME, TrainJob, TrainProgress
from pairloop.validation import describe_validation_error
from services.trainer.celery_app import app
from services.trainer.runner import run_train_job

__all__ = ["parse_job", "train_dpo"]

log = logging.getLogger(__name__)


def parse_job(job: Any) -> TrainJob:
    """Validate the JSON job; a ValidationError lists every bad or missing field by name."""
    if not isinstance(job, dict):
        raise ValidationError(
            f"the training job must be a JSON object (TrainJob), got {type(job).__name__}",
            param="job",
        )
    try:
        return TrainJob.model_validate(job)
    except pydantic.ValidationError as exc:
        detail = describe_validation_error(exc, title="invalid training job")
        raise ValidationError(detail, param="job") from None


@app.task(name=TRAIN_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def train_dpo(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    """Train one DPO job (a `TrainJob` as JSON) and return its `TrainResult` as JSON."""
    parsed = parse_job(job)
    if self.request.id and self.request.id != parsed.job_id:
        log.warning("task id %s is not the job id %s", self.request.id, parsed.job_id)

    def report(progress: TrainProgress) -> None:
        self.update_state(state="PROGRESS", meta=progress.model_dump(mode="json"))

    try:
        result = run_train_job(parsed, self.app.settings, report=report)
    except PairloopError:
        raise
    except SoftTimeLimitExceeded as exc:
        limit = self.app.settings.soft_time_limit
        raise ServerError(
            f"job {parsed.job_id} ran past the soft time limit ({limit}s) and was stopped; its "
            "trainer checkpoints are kept, so submitting it again resumes. Raise "
            "PAIRLOOP_TRAINER_SOFT_TIME_LIMIT (and the hard limit) or lower max_steps"
        ) from exc
    except Exception as exc:
        # Anything else (CUDA OOM, a TRL error) still fails with a message, not a bare type name.
        raise ServerError(
            f"training job {parsed.job_id} failed: {type(exc).__name__}: {exc}. Its trainer "
            "checkpoints are kept; fix the cause and submit it again to resume"
        ) from exc
    return result.model_dump(mode="json")
