"""The trainer's Celery app: Redis broker and result backend, JSON only, one job at a time.

    celery -A services.trainer.celery_app worker --pool prefork --concurrency 1 \\
        --without-gossip --without-mingle --without-heartbeat --loglevel INFO

Why prefork with concurrency 1 (set in the config below, so the short command above is enough):
* time limits: only the prefork pool enforces `task_time_limit` (solo cannot kill its own task);
* isolation: training runs in a child process; a crash (OOM kill, segfault) loses the child, the
  worker survives and, with `task_reject_on_worker_lost`, the job is requeued and resumes from
  its last trainer checkpoint;
* `worker_max_tasks_per_child=1` (default) gives every job a fresh process, so GPU memory,
  accelerate's process-wide state and imported modules never leak from one job into the next.
One process per worker because a job already uses the whole machine (all GPUs, or all cores);
scale by adding workers (one per host), which share the queue.

Redelivery: jobs are acknowledged late (when they end), with prefetch 1, so a job whose worker
dies stays in Redis and is redelivered after `visibility_timeout` (longer than the hard time
limit, or a running job would be handed to a second worker). Resubmitting the job sooner is
safe: the task is idempotent, and the redelivered copy then returns the published result.
"""

from __future__ import annotations

from celery import Celery

from pairloop.jobs import TRAIN_TASK_NAME
from pairloop.train_client import celery_transport_config
from services.trainer.settings import TrainerSettings

__all__ = ["TrainerCelery", "app", "create_celery_app"]


class TrainerCelery(Celery):
    """A Celery app that carries the trainer's settings for its tasks."""

    settings: TrainerSettings


def celery_config(settings: TrainerSettings) -> dict[str, object]:
    """The worker's Celery configuration (on top of the transport config clients share)."""
    conf = celery_transport_config(
        redis_url=settings.redis_url,
        visibility_timeout=settings.visibility_timeout,
        result_retry_s=settings.result_retry_s,
    )
    conf.update(
        task_default_queue=settings.queue,
        task_routes={TRAIN_TASK_NAME: {"queue": settings.queue}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="prefork",
        worker_concurrency=1,
        worker_max_tasks_per_child=settings.max_tasks_per_child or None,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.hard_time_limit,
    )
    return conf


def create_celery_app(settings: TrainerSettings | None = None) -> TrainerCelery:
    """Build the app from `settings` (default: the environment). Nothing heavy is loaded."""
    settings = settings or TrainerSettings()
    celery = TrainerCelery("pairloop-trainer", include=["services.trainer.tasks"])
    celery.settings = settings
    celery.conf.update(celery_config(settings))
    return celery


app = create_celery_app()
