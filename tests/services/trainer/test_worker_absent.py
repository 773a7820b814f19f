"""The orchestrator's trainer client notices a dead worker in bounded time, and a worker that comes
back takes the job again from its last trainer checkpoint.

Real workers on a Redis database of their own; `kill -9` of the first worker's whole process group
mid-training. The client's absence bound is seconds here (minutes by default).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from orchestrator.clients.trainer import NoTrainerWorkerError, TrainerClient
from pairloop.jobs import TRAIN_QUEUE

from .helpers import Worker, make_job, start_worker, wait_for_task

SAVE_STEPS = 3
MAX_STEPS = 30
ABSENT_S = 3.0


def test_a_killed_worker_fails_the_wait_in_bounded_time_and_a_new_one_resumes_the_job(
    redis_url: str, model_store: Path, tmp_path: Path
) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/4"
    job = make_job("absent")
    job.hyperparameters.max_steps = MAX_STEPS
    job.hyperparameters.save_steps = SAVE_STEPS
    client = TrainerClient(url, outage_s=10, worker_absent_s=ABSENT_S, worker_check_s=0.5)
    workers: list[Worker] = []
    try:
        workers.append(start_worker(redis_url=url, store=model_store, log_path=tmp_path / "1.log"))
        client.submit(job)
        seen = wait_for_task(
            workers[0].client.AsyncResult(job.job_id),
            timeout=240,
            worker=workers[0],
            until=lambda p: p.checkpoint_step >= SAVE_STEPS,
        )
        assert seen.final.state == "PROGRESS", f"job ended before the kill: {seen.final}"
        workers[0].process.kill()  # SIGKILL to the worker's whole process group; no restart

        killed_at = time.monotonic()
        with pytest.raises(NoTrainerWorkerError) as info:
            client.wait(job.job_id, timeout=600, resubmit=lambda: client.submit(job))
        waited = time.monotonic() - killed_at
        assert waited < ABSENT_S + 15, f"noticed after {waited:.0f}s"
        message = info.value.message
        assert "\n" not in message and TRAIN_QUEUE in message and job.job_id in message

        # A worker restarted while the run waits (a restart policy, a supervisor) takes the job
        # again: the lost job is resubmitted and resumes from its last trainer checkpoint.
        patient = TrainerClient(url, outage_s=10, worker_absent_s=120, worker_check_s=0.5)
        restart = threading.Thread(
            target=lambda: workers.append(
                start_worker(redis_url=url, store=model_store, log_path=tmp_path / "2.log")
            )
        )
        restart.start()
        try:
            result = patient.wait(job.job_id, timeout=240, resubmit=lambda: patient.submit(job))
        finally:
            restart.join()
            patient.close()
    finally:
        client.close()
        for w in workers:
            w.process.stop()
            w.client.close()

    assert result.steps == MAX_STEPS
    assert SAVE_STEPS <= result.resumed_from_step < MAX_STEPS
    assert result.resumed_from_step >= seen.progress[-1].checkpoint_step
