"""The Celery task `pairloop.train_dpo`: validate the job, call `run_train_job`, report progress.

Thin on purpose: everything it does is in `runner.run_train_job`, which tests and scripts call
directly. Idempotent: the same job again returns the published result without training, and an
interrupted job resumes from its last trainer checkpoint. Send it by name with the JSON job
(`pairloop.train_client.submit_train_job`), with the job id as task id; read progress from
`AsyncResult(job_id).info` while the state is PROGRESS (a `TrainProgress`). A failed task's
error is a `pairloop.errors` type whose message says what to fix.

Neither progress nor the result can cost training: progress is published from a thread of its own
(`progress.ProgressPublisher`), and a finished job waits for Redis before handing Celery its
result. A job that keeps losing its worker process fails after `max_worker_losses`
(`deliveries.DeliveryLedger`, fed by `TrainRequest` in the worker's main process).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pydantic
from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, WorkerLostError
from celery.worker.request import Request

from pairloop.errors import PairloopError, ServerError, ValidationError
from pairloop.jobs import (
    TRAIN_RANK_TASK_NAME,
    TRAIN_TASK_NAME,
    TrainJob,
    TrainProgress,
    TrainResult,
)
from pairloop.validation import describe_validation_error
from services.trainer.celery_app import app
from services.trainer.deliveries import DeliveryLedger, JobCrashLoopError
from services.trainer.fanout import MachineShare, run_machine_share
from services.trainer.progress import ProgressPublisher, wait_for_redis
from services.trainer.runner import run_train_job

__all__ = ["TrainRequest", "parse_job", "train_dpo", "train_dpo_rank"]

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


def _ledger(task: Task) -> DeliveryLedger:
    settings = task.app.settings
    return DeliveryLedger(settings.redis_url, max_losses=settings.max_worker_losses)


class TrainRequest(Request):
    """The worker's main process's view of a training job: counts the job's lost workers.

    A pool child lost mid-job (killed by a signal, exited) is a `WorkerLostError` here; Celery
    then requeues the job (`reject_on_worker_lost`). Below `max_worker_losses` that still
    happens; at it, the job fails with every loss's worker and signal instead.
    """

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError) and not self._already_revoked:
            try:
                if self.task.AsyncResult(self.id).state != "SUCCESS":
                    _ledger(self.task).lost(
                        self.id, worker=self.hostname, pid=self.worker_pid, reason=str(exc)
                    )
            except JobCrashLoopError as crash_loop:
                log.error("%s", crash_loop.message)
                try:
                    raise crash_loop from exc
                except JobCrashLoopError:
                    # Not a worker loss any more: Celery acknowledges the message and stores
                    # this error as the job's result.
                    exc_info = ExceptionInfo()
            except Exception as ledger_error:  # Redis down: requeued as ever
                log.warning("job %s: worker loss not counted: %r", self.id, ledger_error)
        return super().on_failure(exc_info, send_failed_event, return_ok)


@app.task(
    name=TRAIN_TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    Request=TrainRequest,
)
def train_dpo(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    """Train one DPO job (a `TrainJob` as JSON) and return its `TrainResult` as JSON."""
    parsed = parse_job(job)
    task_id = self.request.id or parsed.job_id
    if task_id != parsed.job_id:
        log.warning("task id %s is not the job id %s", task_id, parsed.job_id)
    settings = self.app.settings
    ledger = _ledger(self)
    request = self.request  # thread-local in Celery: captured for the publisher's thread

    def publish(progress: TrainProgress) -> None:
        self.backend.store_result(
            task_id, progress.model_dump(mode="json"), "PROGRESS", request=request
        )

    counted = [False]

    def on_locked() -> None:
        # Under the job's lock: no other attempt of this job runs, so one marked running died.
        ledger.begin(parsed.job_id, worker=str(request.hostname), pid=os.getpid())
        counted[0] = True

    publisher = ProgressPublisher(publish, job_id=parsed.job_id)
    result: TrainResult | None = None
    failure: PairloopError | None = None
    try:
        result = run_train_job(parsed, settings, report=publisher.report, on_locked=on_locked)
    except PairloopError as exc:
        failure = exc
    except SoftTimeLimitExceeded as exc:
        limit = settings.soft_time_limit
        failure = ServerError(
            f"job {parsed.job_id} ran past the soft time limit ({limit}s) and was stopped; its "
            "trainer checkpoints are kept, so submitting it again resumes. Raise "
            "PAIRLOOP_TRAINER_SOFT_TIME_LIMIT (and the hard limit) or lower max_steps"
        )
        failure.__cause__ = exc
    except Exception as exc:
        # Anything else (CUDA OOM, a TRL error) still fails with a message, not a bare type name.
        failure = ServerError(
            f"training job {parsed.job_id} failed: {type(exc).__name__}: {exc}. Its trainer "
            "checkpoints are kept; fix the cause and submit it again to resume"
        )
        failure.__cause__ = exc
    finally:
        publisher.close(timeout=settings.result_retry_s + 5.0)
    # The outcome is safe (published on disk, or checkpoints kept): wait out any Redis outage
    # so that Celery can store it, rather than failing a finished job.
    wait_for_redis(settings.redis_url, job_id=parsed.job_id, what="its outcome")
    if counted[0] or failure is None:
        try:
            ledger.end(parsed.job_id)
        except Exception as exc:  # the count expires on its own
            log.warning("job %s: delivery count not cleared: %r", parsed.job_id, exc)
    if failure is not None:
        raise failure
    assert result is not None  # run_train_job returned
    return result.model_dump(mode="json")


@app.task(name=TRAIN_RANK_TASK_NAME, bind=True, acks_late=False)
def train_dpo_rank(self: Task, share: dict[str, Any]) -> str:
    """Run one machine's ranks of a multi-machine job (a `fanout.MachineShare` as JSON).

    Acknowledged on receipt: a share lost with its worker is never redelivered, the leader's
    next attempt sends a fresh one.
    """
    try:
        parsed = MachineShare.model_validate(share)
    except pydantic.ValidationError as exc:
        raise ValidationError(
            describe_validation_error(exc, title="invalid machine share"), param="share"
        ) from None
    return run_machine_share(parsed, self.app.settings, worker=str(self.request.hostname))
