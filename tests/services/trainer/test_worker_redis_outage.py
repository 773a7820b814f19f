"""A Redis outage longer than the worker's retry budget, mid-training: training goes on, the
result is stored once Redis is back, and the liveness probe passes throughout.

The budget that used to be ~2 minutes is shortened by a setting (`result_retry_s` = 2 s) and the
outage made longer than it (at least 3 budgets, and until training has visibly moved on while
Redis was down), on a redis-server this test owns and restarts on the same port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pairloop_local.redis_server import RedisHandle, start_redis
from services.trainer.spec import last_complete_checkpoint

from .helpers import REPO_ROOT, make_job, start_worker, wait_for_task

RETRY_S = 2
MAX_STEPS = 40
SAVE_STEPS = 2


def _liveness(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.trainer.liveness"],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_training_outlives_a_redis_outage_and_its_result_is_stored_after(
    model_store: Path, tmp_path: Path
) -> None:
    data = tmp_path / "redis"
    handles: list[RedisHandle] = [start_redis(data)]
    port = int(handles[0].url.rsplit(":", 1)[1].split("/")[0])
    probe_env = {
        "PAIRLOOP_TRAINER_HEARTBEAT_FILE": str(tmp_path / "heartbeat"),
        "PAIRLOOP_TRAINER_HEARTBEAT_INTERVAL_S": "0.5",
        "PAIRLOOP_TRAINER_HEARTBEAT_MAX_AGE_S": "5",
    }
    worker = start_worker(
        redis_url=handles[0].url,
        store=model_store,
        log_path=tmp_path / "worker.log",
        env_extra={"PAIRLOOP_TRAINER_RESULT_RETRY_S": str(RETRY_S), **probe_env},
    )
    job = make_job("outage")
    job.hyperparameters.max_steps = MAX_STEPS
    job.hyperparameters.save_steps = SAVE_STEPS
    checkpoints = model_store / ".pairloop-trainer" / job.job_id / "checkpoints"
    output = model_store / "out" / "outage"
    try:
        handle = worker.submit(job)
        wait_for_task(handle, timeout=240, worker=worker, until=lambda p: p.step >= 1)

        handles[0].stop()  # the outage starts
        down_at = time.monotonic()
        before = last_complete_checkpoint(checkpoints)
        step_before = before[1] if before else 0
        deadline = down_at + 180
        while True:
            now = last_complete_checkpoint(checkpoints)
            moved_on = output.exists() or (now is not None and now[1] > step_before)
            if moved_on and time.monotonic() - down_at >= 3 * RETRY_S:
                break
            assert worker.process.alive(), worker.process.log_tail()
            assert time.monotonic() < deadline, (
                f"training made no progress in {deadline - down_at:.0f}s of Redis outage "
                f"(last checkpoint {now}):\n{worker.process.log_tail()}"
            )
            time.sleep(0.1)
        # The probe does not depend on the broker: the busy worker is alive to it.
        probe = _liveness(probe_env)
        assert probe.returncode == 0, probe.stderr

        handles.append(start_redis(data, port=port))  # Redis is back, with its data
        observed = wait_for_task(handle, timeout=240, worker=worker)
    finally:
        worker.process.stop()
        worker.client.close()
        for h in handles:
            h.stop()

    assert observed.final.state == "SUCCESS", observed.final.error
    assert observed.final.result.steps == MAX_STEPS
    assert observed.final.result.resumed_from_step == 0  # never restarted: nothing was lost
    # Once the worker is gone its heartbeat file is gone too, and the probe says so.
    gone = _liveness(probe_env)
    assert gone.returncode == 1 and "no heartbeat file" in gone.stderr
