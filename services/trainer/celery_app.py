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

Liveness: the worker's main process touches `heartbeat_file` from a thread of its own
(`HeartbeatFile`), and `python -m services.trainer.liveness` checks its age. A probe through the
broker (`celery inspect ping`) fails during any Redis outage and would get a busy worker
restarted, losing the training since its last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps

from pairloop.jobs import TRAIN_RANK_TASK_NAME, TRAIN_TASK_NAME
from pairloop.train_client import celery_transport_config
from services.trainer.settings import TrainerSettings

__all__ = ["HeartbeatFile", "TrainerCelery", "app", "create_celery_app"]

log = logging.getLogger(__name__)


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
        task_routes={
            TRAIN_TASK_NAME: {"queue": settings.queue},
            TRAIN_RANK_TASK_NAME: {"queue": settings.queue},
        },
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


class HeartbeatFile(bootsteps.StartStopStep):
    """Touches `settings.heartbeat_file` every `heartbeat_interval_s` while the worker runs.

    From a thread of the worker's main process, which neither the broker connection (it may be
    reconnecting for hours) nor a training job (it runs in a pool child) can hold up.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        settings: TrainerSettings = parent.app.settings
        path, interval = settings.heartbeat_file, settings.heartbeat_interval_s

        def beat() -> None:
            while True:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"{os.getpid()}\n")
                except OSError as exc:
                    log.warning("heartbeat file %s not written: %s", path, exc)
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=beat, name="heartbeat-file", daemon=True)
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        settings: TrainerSettings = parent.app.settings
        with contextlib.suppress(OSError):
            Path(settings.heartbeat_file).unlink()


def create_celery_app(settings: TrainerSettings | None = None) -> TrainerCelery:
    """Build the app from `settings` (default: the environment). Nothing heavy is loaded."""
    settings = settings or TrainerSettings()
    celery = TrainerCelery("pairloop-trainer", include=["services.trainer.tasks"])
    celery.settings = settings
    celery.conf.update(celery_config(settings))
    celery.steps["worker"].add(HeartbeatFile)
    return celery


app = create_celery_app()
