"""Talking to the DPO trainer through Celery: the shared transport config, submit, read state.

The trainer worker (`services/trainer/celery_app.py`) and every client (the orchestrator, tests,
benchmarks) build their Celery app from `celery_transport_config`, so both ends agree on JSON-only
serialization and on the Redis visibility timeout. A client needs no trainer code:

    client = make_train_client("redis://127.0.0.1:6379/0")
    result = submit_train_job(client, job)          # task id = job.job_id
    state = read_train_state(result)                # PENDING / PROGRESS (TrainProgress) / ...
    outcome = TrainResult.model_validate(result.get(timeout=3600))

Celery is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pairloop.jobs import TRAIN_QUEUE, TRAIN_TASK_NAME, TrainJob, TrainProgress, TrainResult

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = [
    "BROKER_RETRY_SECONDS",
    "DEFAULT_VISIBILITY_TIMEOUT",
    "TrainState",
    "celery_transport_config",
    "make_train_client",
    "read_train_state",
    "submit_train_job",
]

# Redis redelivers a message nobody acknowledged after this many seconds. Training jobs are acked
# late (when they finish), so it must exceed the longest training: a 7B DPO epoch runs for hours.
DEFAULT_VISIBILITY_TIMEOUT = 48 * 3600

# How long (seconds, about) a worker keeps retrying a result write while Redis is down.
BROKER_RETRY_SECONDS = 120


def celery_transport_config(
    *, redis_url: str, visibility_timeout: int, result_retry_s: int = BROKER_RETRY_SECONDS
) -> dict[str, Any]:
    """Broker, result backend and serialization settings both the worker and clients use.

    `visibility_timeout` is set everywhere Celery reads it: the broker's transport options (kombu
    redelivery) and the Redis result backend's transport options. `result_retry_s` bounds one
    backend call's retries (about one a second) through a Redis outage.
    """
    transport = {"visibility_timeout": int(visibility_timeout)}
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        # JSON only, both ways: nothing on the wire is ever unpickled.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "broker_transport_options": dict(transport),
        # One backend call rides out a Redis restart of up to `result_retry_s` (default ~2
        # minutes; the default of 20 retries 1 s apart gives up after 20 s). The trainer never
        # depends on it: progress is published from a thread of its own and the result waits
        # on disk until Redis answers (services/trainer/progress.py).
        "result_backend_transport_options": {
            **transport,
            "retry_policy": {
                "max_retries": result_retry_s,
                "interval_start": 0,
                "interval_step": 1,
                "interval_max": 1,
            },
        },
        # Every backend call, reads included (a progress write first reads the stored state),
        # is retried through an outage: without this one read fails the whole training task.
        "result_backend_always_retry": True,
        "result_backend_max_retries": result_retry_s,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 1000,
        # Workers reconnect to a restarted Redis by themselves, however long it is away.
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # A running training goes on through a broker outage (its result goes to the backend);
        # cancelling it would throw away hours of work for a blip.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "redis_socket_connect_timeout": 5,
        "redis_retry_on_timeout": True,
        "task_default_queue": TRAIN_QUEUE,
        "task_routes": {TRAIN_TASK_NAME: {"queue": TRAIN_QUEUE}},
        # Results carry the job, so `celery inspect`/flower and clients can see what ran.
        "result_extended": True,
        "task_track_started": True,
    }


def make_train_client(
    redis_url: str, *, visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
) -> Celery:
    """A Celery app that only sends training jobs and reads their state (no task code)."""
    from celery import Celery

    app = Celery("pairloop-train-client")
    app.conf.update(
        celery_transport_config(redis_url=redis_url, visibility_timeout=visibility_timeout)
    )
    return app


def submit_train_job(client: Celery, job: TrainJob, *, queue: str = TRAIN_QUEUE) -> AsyncResult:
    """Send `job` to the trainer by task name; the Celery task id is `job.job_id`.

    Sending the same job again is safe: the worker returns the published result without training,
    or resumes an interrupted run from its last trainer checkpoint. The previous attempt's stored
    state is dropped first, so a client never mistakes an old SUCCESS or FAILURE for the new one.
    """
    client.AsyncResult(job.job_id).forget()
    return client.send_task(
        TRAIN_TASK_NAME,
        args=[job.model_dump(mode="json")],
        task_id=job.job_id,
        queue=queue,
    )


@dataclass(frozen=True)
class TrainState:
    """A training task's state as a client sees it; exactly one payload field is set, if any."""

    state: str
    progress: TrainProgress | None = None
    result: TrainResult | None = None
    error: str | None = None


def read_train_state(result: AsyncResult) -> TrainState:
    """Read `result`'s current state once (no waiting), with its payload parsed.

    State and payload come from one read of the backend: reading `result.state` and then
    `result.info` can pair a PROGRESS state with the final result written in between.
    """
    meta = result.backend.get_task_meta(result.id, cache=False)
    state, info = meta["status"], meta.get("result")
    if state == "PROGRESS" and isinstance(info, dict):
        return TrainState(state, progress=TrainProgress.model_validate(info))
    if state == "SUCCESS" and isinstance(info, dict):
        return TrainState(state, result=TrainResult.model_validate(info))
    if state == "FAILURE":
        return TrainState(state, error=f"{type(info).__name__}: {info}")
    return TrainState(state)
